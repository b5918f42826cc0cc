"""The benchmark harness runs end to end (tiny sizes) and writes its reports; no timing is checked."""
import sys

from helpers import ROOT, run


def test_quick_benchmark_writes_reports(tmp_path):
    proc = run([sys.executable, "-m", "benchmarks.run", "--quick", "--out", tmp_path], cwd=ROOT)
    decode = (tmp_path / "bench_decode.md").read_text()
    train = (tmp_path / "bench_train.md").read_text()
    memory = (tmp_path / "generation_memory.md").read_text()
    assert (tmp_path / "bench_decode.png").stat().st_size > 0
    for report in (decode, train):
        assert "## Numerical checks" in report and "## Targets" in report, report[:2000]
    assert "SequenceGenerator" in decode and "torch.profiler" in decode
    assert "| layer" not in train and "## layer" in train and "## model" in train
    assert "check ok" in proc.stderr and "BAD" not in proc.stderr
    # --quick generates 32 and 128 tokens with each model, each in its own process; then one ratio row each.
    rows = [line.split(" | ")[:2] for line in memory.splitlines() if line.startswith(("| softmax |", "| t2r |"))]
    assert rows[:4] == [["| softmax", "32"], ["| softmax", "128"], ["| t2r", "32"], ["| t2r", "128"]], memory
    assert [row[0] for row in rows[4:]] == ["| softmax", "| t2r"], memory
    assert "## Target" in memory and "T2R peak RSS generating 128 tokens" in memory
    for report in (decode, train, memory):
        assert "1-minute load average at the start" in report, report[:500]

    # The README's tables are built from the .json beside each report.
    sys.path.insert(0, str(ROOT))
    from tools import readme

    readme.use_results(tmp_path)
    table = readme.bench_decode()
    assert [line.split(" | ")[:2] for line in table.splitlines() if line.startswith("| 1 |") or
            line.startswith("| 4 |")] == [["| 1", "64"], ["| 1", "512"], ["| 4", "64"], ["| 4", "512"]], table
    assert "T2R " in readme.generation_memory() and "(1." in readme.generation_memory()
