"""Runnable examples: `python -m examples.demo` (`make demo`) is the CPU quickstart."""
