"""examples/language_model/wikitext2.py (results/README.md's WikiText-2 command) end to end at a tiny
size, on WikiText-style files written from Python's reference docs."""
import json
import sys

import torch

from helpers import ROOT, rerun_keeps_recorded_rows, run, write_corpus

TINY = ["--vocab", 400, "--teacher-updates", 8, "--tokens-per-sample", 32, "--max-tokens", 256,
        "--rows", "teacher,t2r_pretrain,hybrid_50,teacher_continued,t2r_gated_then_carried"]


def test_wikitext2_recipe_runs_at_tiny_size(tmp_path):
    raw = write_corpus(tmp_path / "raw", n_train=600, n_valid=60, n_test=60)
    data = tmp_path / "wikitext-2"
    data.mkdir()
    for split in ("train", "valid", "test"):
        (data / f"wiki.{split}.tokens").write_text((raw / f"{split}.txt").read_text())
    results = tmp_path / "wikitext2.json"
    cmd = [sys.executable, "-m", "examples.language_model.wikitext2", "--data", data, "--work",
           tmp_path / "work", "--results", results, *TINY]
    run(cmd, cwd=ROOT)
    recorded = json.loads(results.read_text())
    assert set(recorded) == {"teacher", "t2r_pretrain", "hybrid_50", "teacher_continued", "t2r_gated_then_carried",
                             "setup"}
    # Finetunes (and the continued teacher) get a quarter of the teacher's updates.
    for name, updates in (("teacher", 8), ("t2r_pretrain", 2), ("hybrid_50", 2), ("teacher_continued", 2)):
        row = recorded[name]
        assert row["updates"] == updates and 1.0 < row["valid_ppl"] < 1e4 and 1.0 < row["test_ppl"] < 1e4, row
    assert recorded["t2r_pretrain"]["init"] == "teacher" and recorded["t2r_pretrain"]["feature_map"] == "t2r"
    assert recorded["teacher_continued"]["init"] == "teacher" and "feature_map" not in recorded["teacher_continued"]
    # Carried-state scoring needs every layer recurrent: the hybrid has none.
    assert 1.0 < recorded["t2r_pretrain"]["test_ppl_carried"] < 1e4
    assert "test_ppl_carried" not in recorded["hybrid_50"]
    assert "--teacher-updates 8" in recorded["setup"]["commands"]
    # A two-stage row: its last update reads carried streams, resuming the first stage's run
    # (update 1 of 2, Adam and the schedule restored) on the stream task, not starting a new one.
    row = recorded["t2r_gated_then_carried"]
    assert row["updates"] == 2 and row["carried_updates"] == 1 and 1.0 < row["test_ppl_carried"] < 1e4, row
    assert "(epoch 1 @ 1 updates)" in (tmp_path / "work/logs/t2r_gated_then_carried.carried.train.log").read_text()
    last = torch.load(tmp_path / "work/t2r_gated_then_carried/checkpoint_last.pt", map_location="cpu",
                      weights_only=False)
    assert last["optimizer_history"][-1]["num_updates"] == 2 and last["cfg"]["task"]["_name"] == "t2r_truncated_bptt_lm"
    rerun_keeps_recorded_rows(cmd, results, tmp_path / "work")

    # Perplexity by distance from the stream start: carried for every all-recurrent row, windowed for the
    # chosen rows with --by-distance (the recipe checks that the buckets give each overall perplexity back).
    buckets = ["0-128", "128-512", "512-2048", "2048+"]
    assert set(recorded["t2r_pretrain"]["test_ppl_by_distance_carried"]) <= set(buckets)
    run([*cmd[:-2], "--rows", "teacher,t2r_pretrain", "--by-distance"], cwd=ROOT)
    recorded = json.loads(results.read_text())
    for name in ("teacher", "t2r_pretrain"):
        by_distance = recorded[name]["test_ppl_by_distance"]
        assert list(by_distance) == buckets[:len(by_distance)] and all(1 < p < 1e4 for p in by_distance.values())
    assert "test_ppl_by_distance" not in recorded["hybrid_50"]

    # The hybrid trade-off's speed half: decode cost per row and prefix length.
    run([sys.executable, "-m", "examples.language_model.decode_speed", "--work", tmp_path / "work", "--results",
         results, "--lengths", "16,48", "--seconds", 0.05], cwd=ROOT)
    recorded = json.loads(results.read_text())
    for name in ("teacher", "hybrid_50", "t2r_pretrain"):
        costs = recorded[name]["decode_ms_per_token"]
        assert set(costs) == {"16", "48"} and all(ms > 0 for ms in costs.values()), costs

