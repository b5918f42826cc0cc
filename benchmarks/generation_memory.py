"""Memory of long generation: the peak resident set size (RSS) of a process in which fairseq's
SequenceGenerator (beam 1, batch 1) produces exactly N tokens, for T2R (a constant-size state) and,
for contrast, the softmax transformer_lm of the same shape (a key/value cache that grows by one
entry per token and layer).

RSS, not torch tensor bytes (measure.peak_bytes): the claim is about what the user's process
needs, Python objects, allocator caches and fragmentation included. Each (model, N) runs in a
fresh process (`python -m benchmarks.generation_memory '<json>'`), so one run's peak cannot hide
in another's. Every process builds the same model (positions for the longest N), so only N
differs. In it: build the model, generate a few tokens (lazy allocations that every run pays
once: kernel caches, first-call buffers), hand the heap memory freed so far back to the kernel
(malloc_trim: else the build's freed pages, still resident, would absorb what generation
allocates and hide it), reset the kernel's RSS high-water mark to the current RSS and read it
(the baseline), generate N tokens, read the high-water mark again (the peak).
The reset (Linux: "5" written to /proc/self/clear_refs) keeps the model build out of the peak:
building T2R briefly holds the softmax model too, whose weights it copies, and that transient
would otherwise hide everything generation adds. The high-water mark is read as VmHWM from
/proc/self/status, not getrusage's ru_maxrss: ru_maxrss also keeps the peak of the process image
that exec replaced (the parent's, forked), so every child would report the parent's peak.
"""
import ctypes
import gc
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _reset_peak_rss():
    """Sets this process's RSS high-water mark (VmHWM) to its current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_bytes():
    with open("/proc/self/status") as f:
        kib = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    return int(kib) * 1024


def _measure(model_name, length, max_positions, threads, shape):
    """One (model, N) measurement, in this process: dict of bytes and seconds."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)  # before fairseq's import-time chatter

    import torch

    from .decode import sequence_generation
    from .measure import timed
    from .models import build_models

    torch.set_num_threads(threads)
    model = build_models(**shape, max_positions=max_positions, names=(model_name,))[model_name]
    sequence_generation(model, length=8)()
    generate = sequence_generation(model, length=length)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    _reset_peak_rss()
    baseline = _peak_rss_bytes()  # = current RSS, through the same counter as the peak
    tokens = []
    wall, cpu = timed(lambda: tokens.append(generate()))
    peak = _peak_rss_bytes()
    return dict(model=model_name, length=length, tokens=tokens[0].numel(), baseline_bytes=baseline,
                peak_bytes=peak, increment_bytes=peak - baseline, seconds=cpu, wall=wall)


def memory_rows(lengths, *, threads, shape, models=("softmax", "t2r"), log=print):
    """One row per (model, N), each measured in its own fresh process. shape: build_models' size
    arguments (layers, dim, heads, vocab, feature_dim)."""
    rows = []
    for name in models:
        for length in lengths:
            spec = json.dumps(dict(model_name=name, length=length, max_positions=max(lengths) + 64, threads=threads,
                                   shape=shape))
            proc = subprocess.run([sys.executable, "-m", "benchmarks.generation_memory", spec], cwd=ROOT,
                                  stdout=subprocess.PIPE, text=True, check=True)
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            log(f"  {name} N={length}: baseline {row['baseline_bytes'] / 2 ** 20:.1f} MiB, peak "
                f"{row['peak_bytes'] / 2 ** 20:.1f} MiB, +{row['increment_bytes'] / 2 ** 20:.1f} MiB "
                f"({row['seconds']:.1f} s CPU, {row['wall']:.1f} s wall)")
    return rows


if __name__ == "__main__":
    print(json.dumps(_measure(**json.loads(sys.argv[1]))))
