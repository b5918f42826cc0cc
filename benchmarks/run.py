"""Checks the timed forms agree, then writes bench_decode, bench_train, generation_memory (.md, .json) under --out."""
import argparse
import datetime
import functools
import logging
import pathlib
import sys
import time
import warnings

from tools import kit

SIZES = dict(layers=6, dim=512, heads=8, vocab=8000, feature_dim=32, lengths=[128, 512, 1024, 2048, 4096, 8192],
             batches=[1, 16], seconds=3.0, memory_lengths=[512, 8192], train_lengths=[512, 1024, 2048, 4096, 8192],
             train_tokens=8192, train_model_lengths=[512, 4096], train_model_tokens=4096, naive_max_length=2048)
QUICK = dict(layers=2, dim=128, heads=4, vocab=1000, feature_dim=16, lengths=[64, 512], batches=[1, 4], seconds=0.3,
             train_lengths=[128, 512], train_model_lengths=[128, 512], train_tokens=1024, train_model_tokens=1024,
             memory_lengths=[32, 128])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke test in under a minute (overrides the size flags)")
    p.add_argument("--only", default="decode,train,memory", help="which reports")
    p.add_argument("--out", help="results directory (default results/, /tmp/t2r_bench_quick with --quick)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (one: CPU time is then the work itself)")
    for name, default in SIZES.items():
        kind = (lambda text: [int(x) for x in text.split(",") if x]) if isinstance(default, list) else type(default)
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=default, help="%(default)s")
    args = p.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    args.out = pathlib.Path(args.out or ("/tmp/t2r_bench_quick" if args.quick else "results"))
    args.only = set(args.only.split(","))
    if not args.only <= {"decode", "train", "memory"}:
        p.error(f"--only takes decode, train, memory (comma-separated), got {','.join(sorted(args.only))}")
    return args


log = functools.partial(print, file=sys.stderr, flush=True)


def main(argv=None):
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)  # fairseq/hydra chatter, before fairseq is imported
    import torch

    from . import report
    from .checks import run_checks
    from .decode import decode_rows
    from .generation_memory import memory_rows
    from .models import VARIANTS, build_models
    from .train import train_rows

    torch.set_num_threads(args.threads)
    started, info = time.time(), kit.machine()
    shape = dict(layers=args.layers, dim=args.dim, heads=args.heads, vocab=args.vocab, feature_dim=args.feature_dim)
    header = dict(command="python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None else argv),
                  machine=f"{info['cpu']}, {info['cores']} cores, torch {info['torch']} with {args.threads} thread(s)",
                  load_start=kit.load_average(), warning=kit.busy_warning("these timings"),
                  date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
                  shape=f"{args.layers} layers x {args.dim} (heads {args.heads}, FFN {4 * args.dim}), "
                        f"vocab {args.vocab}, T2R feature size {args.feature_dim}, float32")
    log(f"{header['warning'] or ''}\n{header['machine']}, 1-minute load average {header['load_start']:.2f}\n"
        f"models: {header['shape']}".lstrip())
    models = build_models(**shape, max_positions=max(args.lengths + args.train_lengths) + 64)
    checks = run_checks(models, vocab=args.vocab, log=log)
    args.out.mkdir(parents=True, exist_ok=True)
    pick = lambda *names: {m: models[m] for m in names}  # noqa: E731
    timing = dict(vocab=args.vocab, seconds=args.seconds, log=log)
    if "decode" in args.only:
        decode = decode_rows(pick("softmax", "t2r", "floor"), args.lengths, args.batches, **timing)
        constant = decode_rows(pick("t2r"), args.lengths, args.batches, side_by_side=True, **timing)
        variants = decode_rows(pick("t2r", *VARIANTS, "floor"), [min(args.lengths), max(args.lengths)],
                               args.batches, side_by_side=True, **timing)
        report.write_decode(args.out, header, checks, decode, constant, variants)
    if "train" in args.only:
        train = train_rows(models, args.train_lengths, tokens=args.train_tokens, level="layer",
                           naive_max_length=args.naive_max_length, vocab=args.vocab, log=log)
        # One timed round after the (profiled) warm-up: whole-model iterations are long.
        train += train_rows(pick("softmax", "t2r"), args.train_model_lengths, tokens=args.train_model_tokens,
                            level="model", naive_max_length=args.naive_max_length, rounds=1, vocab=args.vocab, log=log)
        report.write_train(args.out, header, checks, train)
    if "memory" in args.only:
        memory = memory_rows(args.memory_lengths, threads=args.threads, shape=shape, log=log)
        report.write_memory(args.out, header, memory)
    log(f"done in {time.time() - started:.0f} s; results in {args.out}/\n"
        + (header["warning"] or kit.busy_warning("these timings") or ""))


if __name__ == "__main__":
    main()
