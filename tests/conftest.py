import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from helpers import MODEL, TRAIN, run, write_corpus  # noqa: E402


@pytest.fixture(scope="session")
def lm_workdir(tmp_path_factory):
    """A tiny binarized corpus and a softmax transformer_lm_wiki103 trained 20 updates on it."""
    root = tmp_path_factory.mktemp("lm")
    write_corpus(root / "raw", n_train=1200, n_valid=100, n_test=100)
    run(["fairseq-preprocess", "--only-source", "--trainpref", root / "raw/train.txt", "--validpref",
         root / "raw/valid.txt", "--testpref", root / "raw/test.txt", "--destdir", root / "bin",
         "--thresholdtgt", 2, "--workers", 1])
    run(["fairseq-train", root / "bin", "--task", "language_modeling", "--arch", "transformer_lm_wiki103",
         *MODEL, *TRAIN, "--max-update", 20, "--save-dir", root / "softmax"])
    return root
