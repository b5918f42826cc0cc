"""Runnable examples, each run from the repository root as `python -m examples....`: `examples.demo`
(`make demo`) is the CPU quickstart; the recipes are in language_model/ and translation/."""
