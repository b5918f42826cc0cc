"""Entry point: `python -m benchmarks.run [--quick] [--only decode,generate,train,memory] [sizes...]`.

Checks numerically that the timed forms agree, then measures and writes markdown tables (and a
plot) under --out: bench_decode.md, bench_decode.png, bench_train.md, generation_memory.md, and the
rows behind each as .json (the README's tables are built from those by `python -m tools.readme`).
Warns loudly when the machine is not idle (1-minute load average above 1).
"""
import argparse
import datetime
import json
import logging
import pathlib
import sys
import time
import warnings

from tools import kit


def save_json(path, header, **rows):
    """The rows behind a markdown file, for tools.readme to build the README's tables from."""
    path.write_text(json.dumps({"header": {**header, "load_end": kit.load_average()}, **rows}, indent=1) + "\n")


def _ints(text):
    return [int(x) for x in text.split(",") if x]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke test in under a minute: a small model and short lengths (overrides the size flags)")
    p.add_argument("--only", default="decode,generate,train,memory", help="which benchmarks, comma-separated")
    p.add_argument("--out", default=None, help="results directory (default results/, /tmp/t2r_bench_quick with --quick)")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--feature-dim", type=int, default=32, help="T2R feature size per head")
    p.add_argument("--lengths", type=_ints, default=[128, 512, 1024, 2048, 4096, 8192], help="decode prefix lengths")
    p.add_argument("--batches", type=_ints, default=[1, 16], help="decode batch sizes")
    p.add_argument("--seconds", type=float, default=3.0, help="decode: timed seconds per model and configuration")
    p.add_argument("--gen-length", type=int, default=512, help="SequenceGenerator output length")
    p.add_argument("--beams", type=_ints, default=[1, 5])
    p.add_argument("--memory-lengths", type=_ints, default=[512, 8192],
                   help="memory: tokens generated, each in a fresh process (peak RSS of the longest vs the shortest)")
    p.add_argument("--train-lengths", type=_ints, default=[512, 1024, 2048, 4096, 8192])
    p.add_argument("--train-tokens", type=int, default=8192,
                   help="tokens per step of the one-layer rows (batch = tokens // length)")
    p.add_argument("--train-model-lengths", type=_ints, default=[512, 4096],
                   help="lengths of the whole-model rows (an iteration takes tens of seconds on one core)")
    p.add_argument("--train-model-tokens", type=int, default=4096, help="tokens per step of the whole-model rows")
    p.add_argument("--naive-max-length", type=int, default=2048,
                   help="longest length for the quadratic T2R form (its T x T matrices grow fast)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads. One by default: on a small machine shared with other jobs, threads "
                        "that wait for each other make timings erratic, and one thread makes CPU time exact")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.dim, args.heads, args.vocab, args.feature_dim = 2, 128, 4, 1000, 16
        args.lengths, args.batches, args.seconds, args.gen_length = [64, 512], [1, 4], 0.3, 32
        args.train_lengths, args.train_model_lengths, args.train_tokens = [128, 512], [128, 512], 1024
        args.train_model_tokens = 1024
        args.memory_lengths = [32, 128]
    args.out = pathlib.Path(args.out or ("/tmp/t2r_bench_quick" if args.quick else "results"))
    args.only = set(args.only.split(","))
    return args


def main(argv=None):
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)  # fairseq/hydra chatter
    import torch

    torch.set_num_threads(args.threads)

    from . import report
    from .checks import assert_checks, run_checks
    from .decode import constant_cost_rows, decode_rows, generation_rows
    from .generation_memory import memory_rows
    from .models import build_models
    from .train import train_rows

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    started = time.time()
    info = kit.machine()
    header = dict(command="python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None else argv),
                  machine=f"{info['cpu']}, {info['cores']} cores, torch {info['torch']} with {args.threads} "
                          f"thread(s)",
                  load_start=kit.load_average(), warning=kit.busy_warning("these timings"),
                  date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
                  shape=f"{args.layers} layers x {args.dim} (heads {args.heads}, FFN {4 * args.dim}), "
                        f"vocab {args.vocab}, T2R feature size {args.feature_dim}, float32")
    if header["warning"]:
        log(header["warning"])
    log(f"{header['machine']}, 1-minute load average {header['load_start']:.2f}\nmodels: {header['shape']}")
    models = build_models(layers=args.layers, dim=args.dim, heads=args.heads, vocab=args.vocab,
                          feature_dim=args.feature_dim,
                          max_positions=max(args.lengths + args.train_lengths + [args.gen_length]) + 64)
    checks = run_checks(models, vocab=args.vocab)
    for what, diff, tol in checks:
        log(f"  check {'ok ' if diff <= tol else 'BAD'} {diff:.1e} (tol {tol:.0e})  {what}")
    assert_checks(checks)
    args.out.mkdir(parents=True, exist_ok=True)

    if args.only & {"decode", "generate"}:
        decode, constant, generate = [], [], []
        if "decode" in args.only:
            log("decode steps")
            decode = decode_rows(models, args.lengths, args.batches, vocab=args.vocab, seconds=args.seconds, log=log)
            log("T2R after every prefix length, side by side")
            constant = constant_cost_rows(models["t2r"], args.lengths, args.batches, vocab=args.vocab,
                                          seconds=args.seconds, log=log)
        if "generate" in args.only:
            log("SequenceGenerator")
            generate = generation_rows({k: models[k] for k in ("softmax", "t2r")}, length=args.gen_length,
                                       beams=args.beams, vocab=args.vocab, log=log)
        profile = report.step_profile(models, max(args.lengths), args.batches, vocab=args.vocab)
        report.write_decode(args.out, header, checks, decode, constant, generate, profile)
        save_json(args.out / "bench_decode.json", header, decode=decode, constant=constant, generate=generate)
    if "train" in args.only:
        log("training")
        train = train_rows(models, args.train_lengths, tokens=args.train_tokens, levels=("layer",),
                           naive_max_length=args.naive_max_length, vocab=args.vocab, log=log)
        # One timed round after the (profiled) warm-up: whole-model iterations are long.
        train += train_rows(models, args.train_model_lengths, tokens=args.train_model_tokens, levels=("model",),
                            naive_max_length=args.naive_max_length, rounds=1, vocab=args.vocab, log=log)
        report.write_train(args.out, header, checks, train)
        save_json(args.out / "bench_train.json", header, train=train)
    if "memory" in args.only:
        log("generation memory (a fresh process per model and length)")
        memory = memory_rows(args.memory_lengths, threads=args.threads, log=log,
                             shape=dict(layers=args.layers, dim=args.dim, heads=args.heads, vocab=args.vocab,
                                        feature_dim=args.feature_dim))
        report.write_memory(args.out, header, memory)
        save_json(args.out / "generation_memory.json", header, memory=memory)
    log(f"done in {time.time() - started:.0f} s; results in {args.out}/")
    if header["warning"] or kit.busy_warning("these timings"):
        log(header["warning"] or kit.busy_warning("these timings"))
    return time.time() - started


if __name__ == "__main__":
    main()
