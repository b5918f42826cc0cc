"""The language-model recipes: `python -m examples.language_model.wikitext2`, `...decode_speed`."""
