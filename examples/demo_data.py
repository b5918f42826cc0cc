"""The demo's corpus: raw text splits (Python's reference documentation, or the user's --data).

With no --data the corpus is Python's own reference documentation (`pydoc_data.topics`, shipped
with every Python): real English prose, about 60k words, so the demo needs no download.
"""
import pathlib
import random
import re

SPLITS = ("train", "valid", "test")
# The layouts --data accepts, tried in order: {split: file name}.
LAYOUTS = ({s: f"{s}.txt" for s in SPLITS}, {s: f"wiki.{s}.tokens" for s in SPLITS})


class DataError(ValueError):
    """The user's --data directory cannot be used; the message says what was expected."""


def find_raw_splits(data_dir) -> dict:
    """{split: path} of the user's raw text in data_dir, in the first layout that is complete."""
    data_dir = pathlib.Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"--data {data_dir}: not a directory")
    for layout in LAYOUTS:
        paths = {s: data_dir / name for s, name in layout.items()}
        if all(p.is_file() for p in paths.values()):
            return paths
    expected = " or ".join("/".join(layout.values()) for layout in LAYOUTS)
    raise DataError(f"--data {data_dir}: expected raw text files {expected}")


def count_words(path) -> int:
    with open(path, encoding="utf-8", errors="replace") as f:
        return sum(len(line.split()) for line in f)


def pydoc_paragraphs() -> list:
    """Paragraphs of Python's reference docs, each on one line (hard wraps undone)."""
    import pydoc_data.topics

    paragraphs = []
    for name in sorted(pydoc_data.topics.topics):
        for block in re.split(r"\n\s*\n", pydoc_data.topics.topics[name]):
            # Drop reST underlines ("*****", "=====") that would otherwise be frequent junk tokens.
            lines = [ln for ln in block.splitlines() if not re.fullmatch(r"\s*([*=\-~^])\1+\s*", ln)]
            text = " ".join(" ".join(lines).split())
            if re.search(r"[A-Za-z]", text):
                paragraphs.append(text)
    return paragraphs


def write_pydoc_splits(directory, heldout_fraction=0.05, seed=0) -> dict:
    """Whole paragraphs go to valid/test at random (about heldout_fraction each), so held-out text
    is unseen prose while each paragraph stays contiguous for the language model."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    splits = {s: [] for s in SPLITS}
    for paragraph in pydoc_paragraphs():
        r = rng.random()
        splits["valid" if r < heldout_fraction else "test" if r < 2 * heldout_fraction else "train"].append(paragraph)
    paths = {}
    for split, lines in splits.items():
        paths[split] = directory / f"{split}.txt"
        paths[split].write_text("\n".join(lines) + "\n")
    return paths
