"""Where T2R cross-attention pays: generation time per sentence against source length, for one
translation model with T2R cross-attention and the same weights with softmax cross-attention.

T2R cross-attention builds a k x d state per head once per sentence and reads it at every step;
softmax cross-attention reads every source key at every step. Both models have T2R self-attention
and the Multi30k recipe's shape by default (2 layers x 128, 4 heads, ffn 512, 4000 shared words,
k = 32). fairseq's SequenceGenerator, beam 5, outputs of a fixed length (min = max length), random
source tokens, one torch thread; the models take turns at each length and each is timed for
--seconds (CPU time: on one thread, the work itself). The time includes the (softmax) encoder, which
both share.

    python -m benchmarks.cross_attention [--lengths 16,32,...,1024] [--output-length 20]

Writes results/cross_attention.{json,md} and results/cross_attention.png.
"""
import argparse
import json
import logging
import pathlib
import sys
import warnings
from types import SimpleNamespace

from tools import kit

from .measure import row_line, timed

MODELS = ("t2r_cross", "softmax_cross")


def build_pair(*, layers, dim, heads, ffn, vocab, feature_dim):
    """{name: model}: a t2r_transformer with T2R cross-attention and its twin with softmax
    cross-attention, sharing every weight they have in common (random init, eval mode)."""
    import torch
    from fairseq import options
    from fairseq.models import ARCH_MODEL_REGISTRY

    import t2r_fairseq  # noqa: F401  (registers the architectures)
    from t2r_fairseq.transfer import placeholder_dictionary

    d = placeholder_dictionary(vocab)
    task = SimpleNamespace(source_dictionary=d, target_dictionary=d)
    flags = ["--encoder-layers", layers, "--decoder-layers", layers, "--encoder-embed-dim", dim, "--decoder-embed-dim",
             dim, "--encoder-ffn-embed-dim", ffn, "--decoder-ffn-embed-dim", ffn, "--encoder-attention-heads", heads,
             "--decoder-attention-heads", heads, "--share-all-embeddings", "--t2r-feature-dim", feature_dim,
             "--max-source-positions", 4096, "--max-target-positions", 1024]
    models = {}
    for name, cross in zip(MODELS, ("t2r", "softmax")):
        args = options.parse_args_and_arch(options.get_training_parser(), [
            "unused", "--task", "translation", "--arch", "t2r_transformer", *map(str, flags),
            "--t2r-cross-attention", cross])
        torch.manual_seed(0)
        models[name] = ARCH_MODEL_REGISTRY["t2r_transformer"].build_model(args, task).eval()
    # The same weights wherever both have them (the softmax twin lacks only the cross feature maps).
    models["softmax_cross"].load_state_dict({k: v for k, v in models["t2r_cross"].state_dict().items()
                                             if k in models["softmax_cross"].state_dict()})
    return models, d


def generation_rows(models, dictionary, lengths, *, output_length, batch, beam, seconds, log=print):
    """One row per (source length, model): CPU ms per sentence of beam search to output_length tokens."""
    import torch
    from fairseq.sequence_generator import SequenceGenerator

    rows = []
    g = torch.Generator().manual_seed(0)
    generators = {name: SequenceGenerator([m], dictionary, beam_size=beam, min_len=output_length, max_len_a=0,
                                          max_len_b=output_length) for name, m in models.items()}
    with torch.no_grad():
        for length in lengths:
            src = torch.randint(dictionary.nspecial, len(dictionary), (batch, length), generator=g)
            src[:, -1] = dictionary.eos()
            sample = {"net_input": {"src_tokens": src, "src_lengths": torch.full((batch,), length)}}
            best = {name: float("inf") for name in models}
            spent = {name: 0.0 for name in models}
            while min(spent.values()) < seconds:  # the models take turns: load drift hits both alike
                for name, generator in generators.items():
                    _, cpu = timed(lambda: generator.generate([models[name]], sample))
                    best[name], spent[name] = min(best[name], cpu), spent[name] + cpu
            for name in models:
                rows.append(dict(source_length=length, model=name, ms_per_sentence=round(1000 * best[name] / batch, 3)))
                log(row_line(rows[-1]))
    return rows


def crossing(rows):
    """The shortest source length from which T2R cross-attention is at least as fast, or None."""
    by = {(r["source_length"], r["model"]): r["ms_per_sentence"] for r in rows}
    lengths = sorted({r["source_length"] for r in rows})
    faster = [n for n in lengths if by[(n, "t2r_cross")] <= by[(n, "softmax_cross")]]
    # From that length on, every longer source too: one noisy point does not make a crossing.
    return next((n for n in faster if all(m in faster for m in lengths if m >= n)), None)


def verdict(crossing) -> str:
    return (f"T2R cross-attention is the cheaper from {crossing} source tokens on" if crossing
            else "T2R cross-attention was the cheaper at no measured length")


def table(rows) -> str:
    by = {(r["source_length"], r["model"]): r["ms_per_sentence"] for r in rows}
    lines = ["| source tokens | T2R cross-attention (ms/sentence) | softmax cross-attention (ms/sentence) | "
             "T2R / softmax |", "| ---: | ---: | ---: | ---: |"]
    for n in sorted({r["source_length"] for r in rows}):
        t, s = by[(n, "t2r_cross")], by[(n, "softmax_cross")]
        lines.append(f"| {n} | {t:.2f} | {s:.2f} | {t / s:.2f} |")
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, label in zip(MODELS, ("T2R cross-attention", "softmax cross-attention")):
        mine = sorted((r["source_length"], r["ms_per_sentence"]) for r in rows if r["model"] == name)
        ax.plot(*zip(*mine), marker="o", label=label)
    ax.set(xscale="log", yscale="log", xlabel="source tokens", ylabel="CPU ms per sentence (beam 5)",
           title="Generation cost against source length")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    p.add_argument("--lengths", type=ints, default=[16, 32, 64, 128, 256, 512, 1024], help="source lengths")
    p.add_argument("--output-length", type=int, default=20, help="target tokens generated per sentence")
    p.add_argument("--batch", type=int, default=8, help="sentences per generate call")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--seconds", type=float, default=3.0, help="CPU seconds timed per model and length")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--vocab", type=int, default=4000)
    p.add_argument("--feature-dim", type=int, default=32)
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results"))
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)  # fairseq/hydra chatter
    import torch

    torch.set_num_threads(1)
    warning = kit.busy_warning("these timings")
    if warning:
        print(warning, file=sys.stderr)
    load_start = kit.load_average()
    models, dictionary = build_pair(layers=args.layers, dim=args.dim, heads=args.heads, ffn=args.ffn,
                                    vocab=args.vocab, feature_dim=args.feature_dim)
    rows = generation_rows(models, dictionary, args.lengths, output_length=args.output_length, batch=args.batch,
                           beam=args.beam, seconds=args.seconds, log=lambda line: print(line, file=sys.stderr))
    info = kit.machine()
    result = dict(
        command="python -m benchmarks.cross_attention " + " ".join(sys.argv[1:] if argv is None else argv),
        machine=f"{info['cpu']}, {info['cores']} cores, torch {info['torch']} with 1 thread",
        load_start=round(load_start, 2), load_end=round(kit.load_average(), 2),
        shape=f"{args.layers} layers x {args.dim} (ffn {args.ffn}, {args.heads} heads), {args.vocab} shared words, "
              f"k = {args.feature_dim}", output_length=args.output_length, batch=args.batch, beam=args.beam,
        crossing=crossing(rows), rows=rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cross_attention.json").write_text(json.dumps(result, indent=1) + "\n")
    where = verdict(result["crossing"])
    (args.out / "cross_attention.md").write_text(
        f"# Generation cost against source length\n\n`{result['command']}` on {result['machine']}; 1-minute load "
        f"average {result['load_start']:.2f} at the start, {result['load_end']:.2f} at the end.\n{result['shape']}; "
        f"beam {args.beam}, {args.output_length} target tokens, {args.batch} sentences per call.\n\n"
        f"{table(rows)}\n\n{where}.\n")
    plot(rows, args.out / "cross_attention.png")
    print(where)


if __name__ == "__main__":
    main()
