"""Test double of the xformers package (see ``tests/fakes/xformers/ops``)."""

__version__ = "0+tracer-test-double"
