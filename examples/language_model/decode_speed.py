"""Per-token generation cost of WikiText-2 rows side by side: the speed half of the hybrid
trade-off (softmax teacher, hybrid softmax/T2R, T2R), measured with `make bench`'s method
(benchmarks/decode.py: prefill, then single-token steps through fairseq's incremental decoding,
models taking turns, CPU time of one thread).

    python -m examples.language_model.decode_speed [--rows teacher,hybrid_50,t2r_pretrain]

Adds "decode_ms_per_token" {prefix length: ms} to each row of results/wikitext2.json.
"""
import argparse
import os
import pathlib
import sys

from tools import kit

ROOT = pathlib.Path(__file__).resolve().parents[2]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m examples.language_model.decode_speed",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=pathlib.Path, default=ROOT / "runs/wikitext2")
    p.add_argument("--results", type=pathlib.Path, default=ROOT / "results/wikitext2.json")
    p.add_argument("--rows", default="teacher,hybrid_50,t2r_pretrain")
    p.add_argument("--lengths", default="256,1024,4096", help="prefix lengths")
    p.add_argument("--seconds", type=float, default=2.0, help="timed seconds per model and length")
    p.add_argument("--note", default="", help="recorded with the setup, e.g. where the timed checkpoints came from")
    args = p.parse_args(argv)
    rows = args.rows.split(",")
    missing = [r for r in rows if not (args.work / r / "checkpoint_last.pt").is_file()]
    if missing:
        sys.exit(f"error: no checkpoint_last.pt for {', '.join(missing)} under {args.work} (run examples.language_model.wikitext2 first)")

    # benchmarks.measure uses torch.profiler, whose C++ side would print status lines.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    import torch
    from fairseq import checkpoint_utils

    import t2r_fairseq  # noqa: F401  (models and safe loading)
    from benchmarks.decode import decode_rows

    torch.set_num_threads(1)  # one sequence: steady timings, no gain from intra-op threads
    models = {r: checkpoint_utils.load_model_ensemble([str(args.work / r / "checkpoint_last.pt")])[0][0].eval()
              for r in rows}
    lengths = [int(x) for x in args.lengths.split(",")]
    vocab = len(next(iter(models.values())).decoder.dictionary)
    warning = kit.busy_warning("these timings")
    if warning:
        print(warning, file=sys.stderr)
    load = kit.load_average()
    measured = decode_rows(models, lengths, [1], vocab=vocab, seconds=args.seconds)
    store = kit.Results(args.results)
    for r in rows:
        store.update(r, decode_ms_per_token={str(m["length"]): round(1000 * m["step_s"], 3)
                                             for m in measured if m["model"] == r})
    store.update("setup", decode=("python -m examples.language_model.decode_speed: batch 1, CPU time per token of "
                                  "one thread after a prefix of L tokens (fairseq incremental decoding); 1-minute "
                                  f"load average {load:.2f} at the start" + (f"; {args.note}" if args.note else "")))


if __name__ == "__main__":
    main()
