"""`make demo` end to end at a tiny size (python -m examples.demo, as the Makefile runs it), and its
--data error path."""
import json
import math
import re
import sys

import pytest

from helpers import ROOT, run

sys.path.insert(0, str(ROOT))  # examples/ is run from the checkout, not installed

TINY = ["--vocab-size", 300, "--layers", 1, "--embed-dim", 32, "--heads", 2, "--feature-dim", 8,
        "--tokens-per-sample", 64, "--max-tokens", 512, "--pretrain-updates", 16, "--finetune-updates", 8,
        "--validations", 2, "--max-prefix", 128]


def demo(*args, check=True):
    return run([sys.executable, "-m", "examples.demo", *args], cwd=ROOT, check=check)


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    (out / "checkpoints" / "softmax").mkdir(parents=True)
    # A stale checkpoint_last.pt that fairseq-train would resume from (and fail on) if the demo
    # did not clear what an earlier run left.
    (out / "checkpoints" / "softmax" / "checkpoint_last.pt").write_text("stale")
    (out / "logs").mkdir()
    (out / "logs" / "stale.log").write_text("from an earlier run")
    proc = demo("--out", out, *TINY)
    return out, proc.stdout


def test_demo_clears_what_an_earlier_run_left(tiny_demo):
    out, _ = tiny_demo
    assert not (out / "logs" / "stale.log").exists()
    assert (out / "checkpoints" / "softmax" / "checkpoint_best.pt").stat().st_size > 1000


def test_demo_writes_report_and_plots(tiny_demo):
    out, stdout = tiny_demo
    for name in ("report.md", "decode_time.png", "ppl_vs_updates.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "decode_time.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "![decode time](decode_time.png)" in report
    # The printed table is the report's.
    assert "| softmax transformer_lm |" in stdout and "| T2R, swap-then-finetune |" in stdout


def test_report_has_finite_perplexities_for_every_model(tiny_demo):
    out, _ = tiny_demo
    report = (out / "report.md").read_text()
    for model in ("softmax transformer_lm", "softmax, trained on for the same updates (fair baseline)",
                  "T2R, swapped, not finetuned", "T2R, swap-then-finetune", "T2R, trained from scratch"):
        row = re.search(rf"^\| {re.escape(model)} \|.*$", report, re.M)
        assert row, model
        valid, test = (float(x) for x in row.group(0).strip("| ").split(" | ")[-2:])
        assert math.isfinite(valid) and math.isfinite(test) and valid > 1 and test > 1, row.group(0)
    results = json.loads((out / "results.json").read_text())
    for name in ("softmax", "softmax_continued", "t2r_swapped", "t2r_converted", "t2r_random"):
        assert math.isfinite(results["runs"][name]["test_ppl"])
    # One validation point per --validations, at the update counts asked for: the fair baseline too.
    for name in ("t2r_converted", "softmax_continued"):
        assert [n for n, _ in results["runs"][name]["curve"]] == [4, 8], name


def test_report_states_the_swap_cost_against_the_fair_baseline(tiny_demo):
    out, _ = tiny_demo
    runs = json.loads((out / "results.json").read_text())["runs"]
    t2r, base = runs["t2r_converted"]["test_ppl"], runs["softmax_continued"]["test_ppl"]
    change = 100 * (t2r / base - 1)
    assert f"test perplexity {t2r:.2f} against {base:.2f}" in (out / "report.md").read_text()
    assert f"({change:+.1f}%)" in (out / "report.md").read_text()


def test_report_has_decode_rows_with_growing_cache_and_constant_state(tiny_demo):
    out, _ = tiny_demo
    rows = re.findall(r"^\| (\d+) \| ([\d.]+) \| ([\d.]+) \| (.+?) \| (.+?) \|$", (out / "report.md").read_text(), re.M)
    assert [int(r[0]) for r in rows] == [64, 128]
    decoding = json.loads((out / "results.json").read_text())["decoding"]
    softmax = [r["state_bytes"] for r in decoding["softmax"]]
    t2r = [r["state_bytes"] for r in decoding["t2r"]]
    assert softmax[1] == 2 * softmax[0] > 0  # the key/value cache grows with the prefix
    assert t2r[0] == t2r[1] > 0  # the recurrent state does not
    assert all(r["ms_per_token"] > 0 for r in decoding["softmax"] + decoding["t2r"])


def test_data_dir_without_text_is_a_one_line_error(tmp_path):
    (tmp_path / "train.txt").write_text("only a train split\n")
    out = tmp_path / "out"
    proc = demo("--data", tmp_path, "--out", out, check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "train.txt/valid.txt/test.txt" in proc.stderr and "wiki.train.tokens" in proc.stderr
    assert not out.exists()  # nothing was started


@pytest.mark.parametrize("layout", ["txt", "wikitext"])
def test_user_data_layouts_are_found(tmp_path, layout):
    from examples.demo_data import find_raw_splits

    names = {s: f"{s}.txt" if layout == "txt" else f"wiki.{s}.tokens" for s in ("train", "valid", "test")}
    for name in names.values():
        (tmp_path / name).write_text("some text\n")
    assert {s: p.name for s, p in find_raw_splits(tmp_path).items()} == names


def _shape(line: str) -> str:
    """A console line with its numbers blanked: what the README's transcript and a fresh run share."""
    return re.sub(r"\d+(\.\d+)?", "N", line.strip())


def test_printed_decode_rows_look_like_the_readme_transcript(tiny_demo):
    """The README's console block is generated from results/demo/console.txt, recorded by an earlier
    run: the printer must still print that format (a changed printer means re-recording it)."""
    _, stdout = tiny_demo
    recorded = (ROOT / "results/demo/console.txt").read_text().splitlines()
    shapes = {_shape(line) for line in recorded if line.strip().startswith("length ")}
    printed = [line for line in stdout.splitlines() if line.strip().startswith("length ")]
    assert shapes and printed
    assert {_shape(line) for line in printed} <= shapes, (printed[:2], sorted(shapes)[:2])


def test_readme_names_every_demo_flag():
    """The demo's sizes are flags; the README lists them (they were only in --help)."""
    proc = demo("--help")
    flags = set(re.findall(r"^\s+(--[a-z-]+)", proc.stdout, flags=re.M)) - {"--help"}
    readme = (ROOT / "README.md").read_text()
    assert flags and not {f for f in flags if f"`{f}`" not in readme and f"{f} " not in readme}, flags
