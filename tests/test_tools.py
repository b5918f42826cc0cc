"""tools/: the floor examples and benchmarks share; docs.generate: the pages' tables and figure built from results/."""
import ast
import json
import os
import sys

import pytest

from helpers import ROOT, run

sys.path.insert(0, str(ROOT))  # tools/ is run from the checkout, not installed

from tools import kit  # noqa: E402


@pytest.mark.parametrize("text,expected", [("Loss (base 2): 6.6, Perplexity: 97.41\n", 97.41),
                                           ("Perplexity: 12.5\nPerplexity: inf", float("inf"))])
def test_perplexity_reads_the_last_value_inf_included(text, expected):
    assert kit.perplexity(text) == expected


def test_perplexity_nan_and_missing():
    assert kit.perplexity("Perplexity: nan") != kit.perplexity("Perplexity: nan")  # nan
    with pytest.raises(ValueError):
        kit.perplexity("no score here")


def test_busy_warning_only_above_the_threshold(monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (0.4, 0.5, 0.5))
    assert kit.busy_warning("timings") is None
    monkeypatch.setattr(os, "getloadavg", lambda: (2.5, 1.0, 0.5))
    warning = kit.busy_warning("timings")
    assert "WARNING: 1-minute load average 2.50 > 1.0" in warning and "timings will be off" in warning


def test_results_rows_survive_other_writers_and_writes_are_atomic(tmp_path):
    path = tmp_path / "r.json"
    first, second = kit.Results(path), kit.Results(path)
    first.record("a", {"ppl": 1.5})
    second.record("b", {"ppl": float("inf")})  # another process's row, recorded in between
    first.update("a", stream=2.0)
    assert json.loads(path.read_text(), parse_constant=float) == {"a": {"ppl": 1.5, "stream": 2.0},
                                                                   "b": {"ppl": float("inf")}}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary left
    assert oct(path.stat().st_mode & 0o777) == "0o644"


def test_run_rows_skips_recorded_rows_unless_forced_and_records_the_setup(tmp_path):
    store, ran = kit.Results(tmp_path / "r.json"), []

    def run_row(name):
        ran.append(name)
        return {"n": len(ran)}

    store.run_rows(["a", "b"], {"a", "b", "c"}, set(), run_row, lambda: {"runs": len(ran)})
    store.update("setup", decode="recorded by another tool")
    store.run_rows(["a", "b", "c"], {"a", "b", "c"}, {"b"}, run_row, lambda: {"runs": len(ran)})
    assert ran == ["a", "b", "b", "c"]
    assert store.load() == {"a": {"n": 1}, "b": {"n": 3}, "c": {"n": 4},
                            "setup": {"runs": 4, "decode": "recorded by another tool"}}
    with pytest.raises(SystemExit, match="unknown row 'd'; rows are a"):
        store.run_rows(["d"], {"a": None}, set(), run_row, dict)


def test_run_logged_writes_command_and_output_and_fails_in_one_line(tmp_path):
    out = kit.run_logged([sys.executable, "-c", "print('hello')"], tmp_path / "ok.log")
    assert out == "hello\n" and (tmp_path / "ok.log").read_text().endswith("\n\nhello\n")
    with pytest.raises(kit.CommandFailed) as e:
        kit.run_logged([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], tmp_path / "bad.log")
    assert "\n" not in str(e.value) and "exit code 3" in str(e.value) and "bad.log" in str(e.value)
    assert e.value.tail == "boom\n"


def test_tools_is_the_floor():
    """tools/ imports nothing of this repository's (examples, benchmarks and docs stand on it)."""
    ours = {"t2r_fairseq", "examples", "benchmarks", "docs"}
    for path in (ROOT / "tools").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not {n.split(".")[0] for n in names} & ours, f"{path.name} imports {names}"


def test_committed_pages_and_figure_match_the_results_files():
    proc = run([sys.executable, "-m", "docs.generate", "--check"], cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr


def test_a_hand_edited_number_makes_the_check_fail(tmp_path):
    text = (ROOT / "results/README.md").read_text()
    start = text.index("<!-- generated: multi30k -->")
    stale = text[:start] + text[start:].replace("|", "| 99.99 |", 3)
    page = tmp_path / "README.md"
    page.write_text(stale)
    proc = run([sys.executable, "-m", "docs.generate", "--check", page], cwd=ROOT, check=False)
    assert proc.returncode == 1 and f"{page} is stale" in proc.stderr
    run([sys.executable, "-m", "docs.generate", page], cwd=ROOT)
    assert page.read_text() == text


def test_the_figure_is_stale_when_its_numbers_change_or_it_is_missing(tmp_path, monkeypatch):
    """Checked by the numbers it plots (kept in the PNG's metadata), not by its pixels."""
    from docs import generate

    assert generate.figure_is_current()
    results = json.loads((ROOT / "results/wikitext2.json").read_text())
    results["t2r_pretrain"]["test_ppl"] += 1
    (tmp_path / "wikitext2.json").write_text(json.dumps(results))
    monkeypatch.setattr(generate, "RESULTS", tmp_path)
    assert not generate.figure_is_current()
    assert not generate.figure_is_current(tmp_path / "missing.png")


def test_the_distance_figure_waits_for_its_numbers_then_is_checked_by_them(tmp_path, monkeypatch):
    """No scores by distance recorded: no figure, and the check passes; once recorded, stale until drawn."""
    from docs import generate

    results = json.loads((ROOT / "results/wikitext2.json").read_text())
    for row in results.values():
        for field in ("test_ppl_by_distance", "test_ppl_by_distance_carried"):
            row.pop(field, None)
    (tmp_path / "wikitext2.json").write_text(json.dumps(results))
    monkeypatch.setattr(generate, "RESULTS", tmp_path)
    figure = tmp_path / "by_distance.png"
    assert generate.distance_figure_data() is None and generate.distance_figure_is_current(figure)
    results["teacher"]["test_ppl_by_distance"] = {"0-128": 90.0, "128-512": 80.0}
    results["t2r_decay_gated"]["test_ppl_by_distance_carried"] = {"0-128": 91.0, "128-512": 78.0}
    (tmp_path / "wikitext2.json").write_text(json.dumps(results))
    assert not generate.distance_figure_is_current(figure)
    generate.draw_distance_figure(figure)
    assert generate.distance_figure_is_current(figure)
    assert [label for label, _ in generate.distance_figure_data()["lines"]] == [
        "teacher (softmax), windowed", "T2R + pretrain, gated decay, state carried"]
