"""The translation recipe: `python -m examples.translation.multi30k`."""
