"""Memory of long generation: peak resident set size (RSS: Python and allocator caches included) and CPU time
while fairseq's SequenceGenerator (beam 1, batch 1) produces exactly N tokens, T2R (a constant-size state) vs softmax
(a kv cache). Each (model, N) runs in a fresh process: build, generate a few tokens, malloc_trim (else generation
reuses freed pages unseen), reset the RSS high-water mark (VmHWM) as the baseline, generate N tokens, read the peak."""
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


def sequence_generation(model, *, length):
    """A call generating exactly `length` tokens with fairseq's SequenceGenerator."""
    from fairseq.sequence_generator import SequenceGenerator  # after _measure silenced fairseq's import chatter

    dictionary = model.decoder.dictionary
    sample = {"net_input": {"src_tokens": torch.tensor([[dictionary.eos()]]), "src_lengths": torch.tensor([1])}}
    generator = SequenceGenerator([model], dictionary, beam_size=1, max_len_a=0, max_len_b=length, min_len=length)
    return lambda: generator.generate([model], sample)


def _measure(model_name, length, max_positions, threads, shape):
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)  # before fairseq's import-time chatter
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
