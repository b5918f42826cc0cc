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
