"""Benchmarks that need an accelerator (``python -m benchmarks.device.<name>``)."""
