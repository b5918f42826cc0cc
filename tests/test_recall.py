"""The recall benchmark (benchmarks/recall.py): its data, its accuracy and a smoke run end to end."""
import json
import random
import sys

import pytest
import torch

from helpers import ROOT, run

sys.path.insert(0, str(ROOT / "benchmarks"))  # where fairseq's --user-dir puts the plugin's parent

from benchmarks.recall import accuracy, goal_points, make_line  # noqa: E402
from recall_plugin import answer_mask  # noqa: E402


@pytest.mark.parametrize("n", [1, 8, 64, 127])
def test_every_answer_is_the_value_paired_with_its_key(n):
    rng = random.Random(n)
    for _ in range(20):
        line = make_line(rng, n, 256, 128, 16)
        assert len(line) == 256
        pairs = list(zip(line[::2], line[1::2]))
        assert all(k.startswith("k") and v.startswith("v") for k, v in pairs)
        keys = [k for k, _ in pairs[:n]]
        assert len(set(keys)) == n  # distinct within the line
        paired = dict(pairs[:n])
        assert all(k in paired and paired[k] == v for k, v in pairs[n:])  # queries ask only keys of the pairs


def test_lines_have_the_length_asked_and_bad_sizes_are_refused():
    rng = random.Random(0)
    assert {len(make_line(rng, n, 64, 40, 8)) for n in (1, 10, 31)} == {64}
    for n, length, keys in ((32, 64, 40), (8, 63, 40), (9, 64, 8)):
        with pytest.raises(ValueError):
            make_line(rng, n, length, keys, 8)


def test_accuracy_counts_argmax_at_the_answers_only():
    # vocab: 0 eos, 1-3 keys, 4-6 values. Line: k1 v4 k2 v5 | k1 v4 k2 v6 (the last answer is deliberately
    # unlike the pair, so the check reads the target, not the pairs).
    is_key = torch.tensor([False, True, True, True, False, False, False])
    src = torch.tensor([[0, 1, 4, 2, 5, 1, 4, 2]])
    target = torch.tensor([[1, 4, 2, 5, 1, 4, 2, 6]])
    assert answer_mask(src, is_key).tolist() == [[False] * 5 + [True, False, True]]
    logits = torch.zeros(1, 8, 7)
    logits[0, 5, 4] = 1  # right at the first answer
    logits[0, 7, 5] = 1  # wrong at the second
    logits[0, 1, 4] = 1  # right, but a pair's value, not an answer: not counted
    assert accuracy(logits, src, target, is_key) == (1, 2)


def test_goal_points():
    data = {"additive": {"accuracy": {"8": 0.9, "16": 0.4, "32": 0.1}},
            "gated_delta": {"accuracy": {"8": 1.0, "16": 0.95, "32": 0.5}}}
    assert goal_points(data) == [16]


def test_quick_run_writes_a_row_a_table_and_a_checkable_figure(tmp_path):
    proc = run([sys.executable, "-m", "benchmarks.recall", "--quick", "--forms", "gated_delta", "--out", tmp_path],
               cwd=ROOT)
    data = json.loads((tmp_path / "recall.json").read_text())
    row = data["gated_delta"]
    assert set(row["accuracy"]) == {"2", "4"} and all(0 <= x <= 1 for x in row["accuracy"].values())
    assert row["train_minutes"] > 0 and "--t2r-update" in row["flags"]
    assert data["setup"]["updates"] == 4 and "load_average" in data["setup"]["machine"]
    assert "| gated delta" in (tmp_path / "recall.md").read_text() and "N = 4" in proc.stdout

    from PIL import Image

    from benchmarks.recall import plot_data

    with Image.open(tmp_path / "recall.png") as image:
        assert json.loads(image.text["t2r-data"]) == plot_data(data)
    # A rerun resumes: the recorded row is kept, nothing is trained again.
    again = run([sys.executable, "-m", "benchmarks.recall", "--quick", "--forms", "gated_delta", "--out", tmp_path],
                cwd=ROOT)
    assert "recorded already" in again.stdout
    assert json.loads((tmp_path / "recall.json").read_text())["gated_delta"] == row


def test_the_in_context_guess_reference():
    from benchmarks.recall import guess_from_line

    # Pairs k1 v3, k2 v3, k4 v5: two distinct values, so a random one of them is right half the time.
    assert guess_from_line("k1 v3 k2 v3 k4 v5 k2 v3 k4 v5") == 0.5
    rng = random.Random(0)
    lines = [" ".join(make_line(rng, 16, 128, 64, 1000)) for _ in range(50)]
    assert 1 / 16 <= sum(map(guess_from_line, lines)) / 50 < 1 / 15  # 1000 values: repeats are rare
