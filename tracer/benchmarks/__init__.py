"""The pieces of ``python -m tracer.bench``: fair timing, the debug batch, disk and comparator
probes, production batches and time to verdict, and the report (text, JSON, Markdown)."""
