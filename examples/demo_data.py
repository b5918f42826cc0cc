"""The demo's corpus: raw text splits, a sentencepiece BPE model, and the encoded splits that
fairseq-preprocess binarizes.

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


def learn_bpe(train_path, model_prefix, vocab_size) -> pathlib.Path:
    """A sentencepiece BPE model learned on the train split; returns the .model path."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        input=str(train_path), model_prefix=str(model_prefix), vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0,
        # Large user corpora (WikiText-103) would take minutes to learn on; a sample is plenty.
        input_sentence_size=300_000, shuffle_input_sentence=True,
        # fairseq-preprocess builds its own dictionary with its own <unk>, <s>, </s> and <pad>.
        bos_id=-1, eos_id=-1, minloglevel=2)
    return pathlib.Path(f"{model_prefix}.model")


def encode(model_path, raw_path, out_path) -> int:
    """Write raw_path as space-separated BPE pieces, a line per line; returns the number of pieces."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    count = 0
    with open(raw_path, encoding="utf-8", errors="replace") as src, open(out_path, "w", encoding="utf-8") as out:
        for line in src:
            pieces = sp.encode(line.strip(), out_type=str)
            count += len(pieces) + 1  # + the end-of-sentence token fairseq appends to every line
            out.write(" ".join(pieces) + "\n")
    return count
