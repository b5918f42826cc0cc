"""Memory of long generation: the peak resident set size (RSS) of a process in which fairseq's
SequenceGenerator (beam 1, batch 1) produces exactly N tokens, T2R (a constant-size state) against
the softmax transformer_lm of the same shape (a key/value cache that grows with every token).

RSS, not tensor bytes: what the user's process needs, Python objects and allocator caches included.
Each (model, N) runs in a fresh process that builds the same model (positions for the longest N),
generates a few tokens (one-time allocations), returns freed heap pages to the kernel (malloc_trim:
else generation would reuse the build's resident pages unseen), resets the kernel's RSS high-water
mark (VmHWM; "5" written to /proc/self/clear_refs, which keeps the build's transient peak out),
reads it as the baseline, generates N tokens and reads it again as the peak.
"""
import ctypes
import gc
import itertools
import json
import logging
import pathlib
import subprocess
import sys
import warnings

import torch

from .measure import row_line, timed

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _peak_rss_bytes():
    """VmHWM, not getrusage's ru_maxrss, which keeps the peak of the forked parent's image too."""
    with open("/proc/self/status") as f:
        kib = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    return int(kib) * 1024


def _measure(model_name, length, max_positions, threads, shape):
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)  # before fairseq's import-time chatter
    from .decode import sequence_generation
    from .models import build_models

    torch.set_num_threads(threads)
    model = build_models(**shape, max_positions=max_positions, names=(model_name,))[model_name]
    sequence_generation(model, length=8)()
    generate = sequence_generation(model, length=length)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the high-water mark := the current RSS
    baseline = _peak_rss_bytes()  # = current RSS, through the same counter as the peak
    wall, cpu = timed(generate)
    peak = _peak_rss_bytes()
    return dict(model=model_name, length=length, baseline_bytes=baseline,
                peak_bytes=peak, increment_bytes=peak - baseline, seconds=cpu, wall=wall)


def memory_rows(lengths, *, threads, shape, models=("softmax", "t2r"), log=print):
    """One row per (model, N), each measured in a fresh process. shape: build_models' size arguments."""
    rows = []
    for name, length in itertools.product(models, lengths):
        spec = dict(model_name=name, length=length, max_positions=max(lengths) + 64, threads=threads, shape=shape)
        proc = subprocess.run([sys.executable, "-m", "benchmarks.generation_memory", json.dumps(spec)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        log(row_line(rows[-1]))
    return rows


if __name__ == "__main__":
    print(json.dumps(_measure(**json.loads(sys.argv[1]))))
