"""The benchmark harness runs end to end (tiny sizes) and writes its reports and the rows behind
them; no timing is checked, only that every table has its rows and every number is sane."""
import json
import sys

from helpers import ROOT, run

QUICK_LENGTHS, QUICK_BATCHES, QUICK_MEMORY_LENGTHS = [64, 512], [1, 4], [32, 128]
DECAYS = ("t2r_fixed", "t2r_learned", "t2r_gated")
# benchmarks.models.VARIANTS: t2r with a decay, with a sliding window (W=64), with the delta rule (and gated decay)
VARIANTS = (*DECAYS, "t2r_window", "t2r_delta", "t2r_gated_delta")


def _table(markdown, head):
    """The rows (lists of cells) of the markdown table whose header starts with `head`."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(head))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            return rows
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_quick_benchmark_writes_every_table(tmp_path, monkeypatch):
    proc = run([sys.executable, "-m", "benchmarks.run", "--quick", "--out", tmp_path], cwd=ROOT)
    assert "BAD" not in proc.stderr
    md = {name: (tmp_path / f"{name}.md").read_text() for name in ("bench_decode", "bench_train", "generation_memory")}
    data = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in md}
    for name in md:
        assert data[name]["header"]["load_start"] >= 0 and data[name]["header"]["load_end"] >= 0

    # Numerical checks (every model including each variant, the folded T2R fast path, the chunked training
    # form of t2r, t2r_window and t2r_gated_delta) ran before timing, all within tolerance.
    for name in ("bench_decode", "bench_train"):
        checks = _table(md[name], "| check |")
        assert [row[0].split(":")[0] for row in checks if "incremental steps" in row[0]] == [
            "softmax", "t2r", "floor", *VARIANTS]
        assert [row[0].split()[0] for row in checks if "chunked vs naive" in row[0]] == [
            "t2r", "t2r_window", "t2r_gated_delta"]
        assert len(checks) == 3 + len(VARIANTS) + 1 + 3 and all(float(diff) <= float(tol) for _, diff, tol in checks), checks

    decode = data["bench_decode"]
    grid = [(b, n) for b in QUICK_BATCHES for n in QUICK_LENGTHS]
    rows = {(r["length"], r["batch"], r["model"]): r for r in decode["decode"]}
    assert len(decode["decode"]) == len(rows) == 3 * len(grid)
    for b, n in grid:
        for m in ("softmax", "t2r", "floor"):
            assert rows[(n, b, m)]["step_s"] > 0 and rows[(n, b, m)]["wall_s"] > 0 and rows[(n, b, m)]["peak_bytes"] > 0
        assert rows[(n, b, "floor")]["state_bytes"] == 0
        # kv cache: 2 (k, v) x layers x batch x length x dim float32; T2R's state does not grow with L.
        assert rows[(n, b, "softmax")]["state_bytes"] == 2 * 2 * b * n * 128 * 4
        assert rows[(n, b, "t2r")]["state_bytes"] == rows[(QUICK_LENGTHS[0], b, "t2r")]["state_bytes"] > 0
    assert [[int(c) for c in row[:2]] for row in _table(md["bench_decode"], "| batch | prefix L | softmax ms")] \
        == [[b, n] for b, n in grid]
    assert [[int(c) for c in row[:2]] for row in _table(md["bench_decode"], "| batch | prefix L | softmax kv")] \
        == [[b, n] for b, n in grid]
    assert sorted((r["batch"], r["length"]) for r in decode["constant"]) == grid
    assert [int(row[0]) for row in _table(md["bench_decode"], "| batch | L=64 ms")] == QUICK_BATCHES
    # Variants: each, plain T2R and the floor taking turns at the shortest and longest prefix; a decay adds
    # nothing to the state, a window its ring of the last W keys: larger, and the same after either prefix.
    # Targets: within a factor of the floor, and flat, per variant.
    variants = {(r["length"], r["batch"], r["model"]): r for r in decode["variants"]}
    forms = ("t2r", *VARIANTS, "floor")
    assert len(decode["variants"]) == len(variants) and set(variants) == {
        (n, b, m) for n in QUICK_LENGTHS for b in QUICK_BATCHES for m in forms}
    for (n, b, m), r in variants.items():
        assert r["step_s"] > 0 and r["wall_s"] > 0 and r["peak_bytes"] > 0
        if m in ("t2r", *DECAYS):
            assert r["state_bytes"] == rows[(QUICK_LENGTHS[0], b, "t2r")]["state_bytes"]
    for b in QUICK_BATCHES:
        window = [variants[(n, b, "t2r_window")]["state_bytes"] for n in QUICK_LENGTHS]
        assert window[0] == window[1] > rows[(QUICK_LENGTHS[0], b, "t2r")]["state_bytes"]
    assert [row[:2] for row in _table(md["bench_decode"], "| batch | model |")] == [
        [str(b), m] for b in QUICK_BATCHES for m in forms]
    goals = _table(md["bench_decode"], "| target |")
    assert len(goals) == 2 * len(QUICK_BATCHES) + 2 + 2 * len(VARIANTS)
    assert [g[0].split()[0] for g in goals[-2 * len(VARIANTS):]] == [m for m in VARIANTS for _ in range(2)]
    # Measured here (the quick lengths), so each says met or MISSED, from the numbers.
    assert all(g[2] in ("met", "MISSED") for g in goals if not g[0].startswith("T2R >="))

    train = data["bench_train"]["train"]
    plain = ("softmax", "t2r", "t2r-naive")
    assert sorted((r["level"], r["length"], r["form"]) for r in train) == sorted(
        [("layer", n, form) for n in (128, 512) for form in plain + VARIANTS] +
        [("model", n, form) for n in (128, 512) for form in plain])
    assert all(r["token_s"] > 0 and r["token_bytes"] > 0 for r in train)
    for level in ("## layer", "## model"):
        table = md["bench_train"].split(level, 1)[1]
        assert [row[:2] for row in _table(table, "| length |")] == [["128", "8"], ["512", "2"]]
    variants_md = md["bench_train"].split("## layer: decay", 1)[1]
    assert [row[:2] for row in _table(variants_md, "| length |")] == [["128", "8"], ["512", "2"]]
    assert all(f"| {m} / t2r |" in variants_md.split("\n\n")[1] for m in VARIANTS)
    goals = [row[0] for row in _table(md["bench_train"], "| target |")]
    assert len(goals) == 4 + len(VARIANTS) + 1 and goals[-1].startswith("chunked t2r_window faster than softmax")

    # Generation memory (and CPU time): each model and length in its own process, then one ratio row per model.
    memory = data["generation_memory"]["memory"]
    assert [(r["model"], r["length"]) for r in memory] == [
        (m, n) for m in ("softmax", "t2r") for n in QUICK_MEMORY_LENGTHS]
    assert all(r["peak_bytes"] >= r["baseline_bytes"] > 0 and r["increment_bytes"] == r["peak_bytes"] -
               r["baseline_bytes"] and r["seconds"] > 0 for r in memory)
    assert [row[:2] for row in _table(md["generation_memory"], "| model | tokens generated")] == [
        [m, str(n)] for m in ("softmax", "t2r") for n in QUICK_MEMORY_LENGTHS]
    assert [row[0] for row in _table(md["generation_memory"], "| model | peak(")] == ["softmax", "t2r"]
    assert len(_table(md["generation_memory"], "| target |")) == 1

    # results/README.md's tables are built from the .json beside each report.
    sys.path.insert(0, str(ROOT))
    from docs import generate

    monkeypatch.setattr(generate, "RESULTS", tmp_path)
    table = generate.bench_decode()
    assert [line.split(" | ")[:2] for line in table.splitlines() if line.startswith(("| 1 |", "| 4 |"))] == [
        ["| 1", str(n)] for n in QUICK_LENGTHS] + [["| 4", str(n)] for n in QUICK_LENGTHS], table
    assert "T2R " in generate.generation_memory() and "(1." in generate.generation_memory()


def test_unknown_report_is_a_one_line_error():
    proc = run([sys.executable, "-m", "benchmarks.run", "--only", "decode,generate"], cwd=ROOT, check=False)
    assert proc.returncode == 2 and "--only takes decode, train, memory (comma-separated), got decode,generate" \
        in proc.stderr.splitlines()[-1]


def test_cross_attention_crossing_benchmark_writes_its_table_and_plot(tmp_path):
    """python -m benchmarks.cross_attention at a tiny size: a row per (source length, model), the
    table and plot, and a crossing that is one of the measured lengths (or none)."""
    proc = run([sys.executable, "-m", "benchmarks.cross_attention", "--lengths", "8,32", "--output-length", 3,
                "--batch", 2, "--seconds", 0.05, "--layers", 1, "--dim", 32, "--heads", 2, "--ffn", 64,
                "--vocab", 100, "--feature-dim", 8, "--out", tmp_path], cwd=ROOT)
    data = json.loads((tmp_path / "cross_attention.json").read_text())
    assert sorted((r["source_length"], r["model"]) for r in data["rows"]) == [
        (n, m) for n in (8, 32) for m in ("softmax_cross", "t2r_cross")]
    assert all(r["ms_per_sentence"] > 0 for r in data["rows"])
    assert data["crossing"] in (None, 8, 32)
    rows = _table((tmp_path / "cross_attention.md").read_text(), "| source tokens")
    assert [row[0] for row in rows] == ["8", "32"]
    assert (tmp_path / "cross_attention.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "cross-attention" in proc.stdout
