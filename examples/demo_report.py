"""The demo's outputs: report.md (tables), results.json (the same numbers, for scripts and
tests), decode_time.png and ppl_vs_updates.png."""
import json
import pathlib

ROWS = (  # (run name, model, initialized from)
    ("softmax", "softmax transformer_lm", "random"),
    ("t2r_swapped", "T2R, swapped, not finetuned", "softmax weights"),
    ("t2r_converted", "T2R, swap-then-finetune", "softmax weights"),
    ("t2r_random", "T2R, trained from scratch", "random"),
)


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def minutes(seconds) -> str:
    return "-" if seconds is None else f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


def tables(runs: dict, decoding: dict) -> str:
    lines = ["Perplexity (BPE tokens; fairseq-eval-lm, lower is better)", "",
             "| model | initialized from | updates | fairseq-train wall time | valid ppl | test ppl |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for name, model, init in ROWS:
        r = runs[name]
        lines.append(f"| {model} | {init} | {r['updates']} | {minutes(r['train_seconds'])} "
                     f"| {r['valid_ppl']:.2f} | {r['test_ppl']:.2f} |")
    lines += ["", "Generation, one sequence, per new token after a prefix of L tokens (fairseq incremental decoding)",
              "", "| prefix L | softmax ms/token | T2R ms/token | softmax key/value cache | T2R recurrent state |",
              "| ---: | ---: | ---: | ---: | ---: |"]
    for soft, t2r in zip(decoding["softmax"], decoding["t2r_converted"]):
        lines.append(f"| {soft['prefix']} | {soft['ms_per_token']:.2f} | {t2r['ms_per_token']:.2f} "
                     f"| {human_bytes(soft['state_bytes'])} | {human_bytes(t2r['state_bytes'])} |")
    return "\n".join(lines)


def plot_decoding(decoding: dict, path: pathlib.Path):
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, label, style in (("softmax", "softmax (key/value cache)", "o-"), ("t2r_converted", "T2R (RNN state)", "s-")):
        rows = decoding[name]
        prefixes = [r["prefix"] for r in rows]
        left.plot(prefixes, [r["ms_per_token"] for r in rows], style, label=label)
        right.plot(prefixes, [r["state_bytes"] / 2 ** 20 for r in rows], style, label=label)
    for ax, ylabel in ((left, "ms per generated token"), (right, "MiB held between steps")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prefix length (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    right.set_yscale("log")
    left.set_ylim(bottom=0)
    fig.suptitle("Generation cost as the prefix grows (batch 1)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(runs: dict, path: pathlib.Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    # The converted curve starts from the swapped, not yet finetuned, model at update 0.
    converted = [(0, runs["t2r_swapped"]["valid_ppl"])] + runs["t2r_converted"]["curve"]
    for points, label, style in ((converted, "T2R, swap-then-finetune", "s-"),
                                 (runs["t2r_random"]["curve"], "T2R, random init", "^-")):
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.axhline(runs["softmax"]["valid_ppl"], color="gray", linestyle="--",
               label=f"softmax transformer ({runs['softmax']['updates']} updates)")
    ax.set_yscale("log")
    ax.set_xlabel("T2R training updates")
    ax.set_ylabel("validation perplexity")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    ax.set_title("Swap-then-finetune vs training T2R from scratch")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out: pathlib.Path, args, runs: dict, decoding: dict, machine: dict) -> str:
    """Write every output; returns the tables (markdown) for printing."""
    text = tables(runs, decoding)
    settings = (f"{args.layers} layers, width {args.embed_dim}, {args.heads} heads, T2R feature size "
                f"{args.feature_dim}; BPE vocabulary {args.vocab_size}; blocks of {args.tokens_per_sample} tokens, "
                f"{args.max_tokens} tokens per batch")
    (out / "report.md").write_text(
        "# T2R demo: swap-then-finetune\n\n"
        f"Corpus: {args.data or 'Python reference documentation (pydoc_data.topics)'}. Models: {settings}.\n\n"
        f"{text}\n\n"
        "![decode time](decode_time.png)\n\n![perplexity vs updates](ppl_vs_updates.png)\n\n"
        f"Machine: {machine['cpus']} CPUs, {machine['platform']}, Python {machine['python']}. "
        f"Whole demo: {minutes(machine['wall_seconds'])} wall, {machine['cpu_seconds']:.0f} CPU-seconds "
        f"(wall time depends on what else the machine runs).\n\n"
        "Each fairseq command line and its output: `logs/`.\n")
    results = {"args": vars(args), "machine": machine, "decoding": decoding,
               "runs": {name: {k: str(v) if k == "checkpoint" else v for k, v in r.items()}
                        for name, r in runs.items()}}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_decoding(decoding, out / "decode_time.png")
    plot_curves(runs, out / "ppl_vs_updates.png")
    return text
