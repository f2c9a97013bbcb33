"""The pieces of ``python -m tracer.bench``: fair timing, the debug batch, disk probes, production batches, the report."""
