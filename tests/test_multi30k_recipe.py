"""examples/translation/multi30k.py (the translation README's Multi30k command) end to end at a tiny size
(needs ../shared/data/multi30k)."""
import json
import re
import sys

import pytest

from helpers import ROOT, SHARED_DATA, USER_DIR, rerun_keeps_recorded_rows, run

MULTI30K = SHARED_DATA / "multi30k"
TINY_RECIPE = ["--train-lines", 200, "--valid-lines", 30, "--test-lines", 20, "--vocab", 300, "--layers", 1,
               "--embed-dim", 32, "--ffn-dim", 64, "--heads", 2, "--feature-dim", 8, "--teacher-updates", 8,
               "--finetune-updates", 3, "--max-tokens", 1024,
               # The ELU row runs the same code path as T2R with one more flag, and the interleaved
               # re-timing repeats the rows' own generate runs: skipping both saves five CLI runs.
               # t2r_window_distill: every new piece at once (window, transfer criterion with label smoothing, KL).
               "--rows", "teacher,t2r_pretrain,teacher_continued,t2r_window_distill", "--speed-repeats", 0]


@pytest.mark.skipif(not (MULTI30K / "train.en").is_file(), reason=f"needs Multi30k at {MULTI30K}")
def test_multi30k_recipe_runs_at_tiny_size(tmp_path):
    results = tmp_path / "multi30k.json"
    cmd = [sys.executable, "-m", "examples.translation.multi30k", MULTI30K, "--work", tmp_path / "work",
           "--results", results, *TINY_RECIPE]
    run(cmd, cwd=ROOT)
    recorded = json.loads(results.read_text())
    assert set(recorded) == {"teacher", "t2r_pretrain", "teacher_continued", "t2r_window_distill", "setup"}
    # teacher_continued gets exactly the updates T2R's finetuning got.
    for name, updates in (("teacher", 8), ("t2r_pretrain", 3), ("teacher_continued", 3), ("t2r_window_distill", 3)):
        row = recorded[name]
        assert 0.0 <= row["bleu"] <= 100.0 and row["updates"] == updates, row
        assert row["sentences_per_s_runs"] == [row["sentences_per_s"]] and row["sentences_per_s"] > 0
        hyps = (tmp_path / f"work/{name}.test.de").read_text().splitlines()
        assert len(hyps) == 20 and "▁" not in "".join(hyps)  # detokenized: sentencepiece pieces joined
    commands = "\n".join(recorded["setup"]["commands"])
    assert "--task t2r_translation" in commands and "--convert-from" in commands
    assert "--finetune-from-model" in commands
    assert "--criterion t2r_attention_transfer" in commands and "--distill-kl-weight 0.5" in commands
    assert recorded["t2r_window_distill"]["t2r_options"].startswith("--t2r-window 64")
    assert {"machine", "date"} <= set(recorded["setup"])
    rerun_keeps_recorded_rows(cmd, results, tmp_path / "work")
    # The README's fairseq-interactive command, with the recipe's sentencepiece model.
    work = tmp_path / "work"
    line = tmp_path / "input.en"
    line.write_text("A man is riding a bike.\n")
    out = run(["fairseq-interactive", work / "bin", "--user-dir", USER_DIR, "--path",
               work / "t2r_pretrain/checkpoint_last.pt", "--beam", 5, "--bpe", "sentencepiece",
               "--sentencepiece-model", work / "spm/spm.model", "--source-lang", "en", "--target-lang", "de",
               "--max-len-b", 10, "--cpu", "--input", line]).stdout
    assert re.search(r"^D-0\t\S+\t[^▁]*$", out, flags=re.M), out
