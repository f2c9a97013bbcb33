"""tracer: a layer-by-layer numerical divergence tracer for packed vs padded ESM-2 forwards.

Read API::

    import tracer
    t = tracer.open_trace("traces/run.h5")
    t.summary["first_divergence"]                   # the verdict the run stored
    q = t.tap("packed", "layers.0.q_rope")          # torch tensor, (N, H, d), canonical rows
    large = t.tap("unpacked", "layers.35.resid_out", rows=t.token_slice("large"))
    summary = tracer.summarize(t)                   # re-judge from the tensors

In your own packed forward, for a value the tool cannot see (costs nothing when not tracing)::

    q = tracer.tap("q_rope", i, q, scale=softmax_scale)

Command line: ``python -m tracer.run``, ``tracer.compare``, ``tracer.plot``, ``tracer.bundle``,
``tracer.bench``.
"""

from tracer.errors import TracerError

__version__ = "0.1.0"


def __getattr__(name):
    # the read API is imported on first use, so that ``python -m tracer.run`` reaches its
    # entry point (and its signal handling) before torch and h5py load
    if name in ("Trace", "open_trace"):
        from tracer.store import trace_file as store

        return getattr(store, name)
    if name == "tap":
        from tracer.capture.observe import tap

        return tap
    raise AttributeError(f"module 'tracer' has no attribute {name!r}")


def summarize(trace, rule=None, recompute=True):
    """Judge a trace (see :func:`tracer.judging.tables.summarize`)."""
    from tracer.judging.tables import summarize as _summarize

    return _summarize(trace, rule, recompute)


__all__ = ["TracerError", "Trace", "open_trace", "summarize", "tap", "__version__"]
