"""The documentation beyond the README, and its generator: `python -m docs.generate --check`."""
