"""The benchmark harness runs end to end (tiny sizes) and writes its reports; no timing is checked."""
import sys

from helpers import ROOT, run


def test_quick_benchmark_writes_reports(tmp_path):
    proc = run([sys.executable, "-m", "benchmarks.run", "--quick", "--out", tmp_path], cwd=ROOT)
    decode = (tmp_path / "bench_decode.md").read_text()
    train = (tmp_path / "bench_train.md").read_text()
    assert (tmp_path / "bench_decode.png").stat().st_size > 0
    for report in (decode, train):
        assert "## Numerical checks" in report and "## Targets" in report, report[:2000]
    assert "SequenceGenerator" in decode and "torch.profiler" in decode
    assert "| layer" not in train and "## layer" in train and "## model" in train
    assert "check ok" in proc.stderr and "BAD" not in proc.stderr
