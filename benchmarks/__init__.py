"""Speed and memory harnesses for t2r_fairseq: `python -m benchmarks.run --help` (or `make bench`)."""
