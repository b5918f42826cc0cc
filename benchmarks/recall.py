"""Multi-query associative recall (MQAR, as in the Zoology study, Arora et al. 2023): can a recurrent
state hold N key-value pairs and give back the value of each key asked for later?

Each line is L tokens: N pairs `k v` (N distinct keys, values drawn at random), then queries `k v` of
those keys filling the rest of the line. One tiny `t2r_lm` per state update (additive T2R, gated, delta,
gated delta, softmax window + linear) and a softmax `transformer_lm` as the upper bound are trained
from scratch with fairseq-train on a mixture of every N, the same size, feature size and updates for
all, with the loss on the answers only; accuracy (argmax at every answer) is measured per N on
held-out lines.

    python -m benchmarks.recall [--forms additive,gated,...] [--out results] [--quick]

Writes <out>/recall.json (a row per form, recorded as it ends: a rerun resumes) and, from it,
<out>/recall.md and <out>/recall.png; the generated block `recall` of results/README.md shows the table.
"""
import argparse
import json
import pathlib
import random
import shlex
import sys
import time

from tools import kit

ROOT = pathlib.Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "benchmarks" / "recall_plugin"

# name -> (label, fairseq-train flags beyond the shared ones)
FORMS = {
    "additive": ("additive T2R (the paper's)", ["--arch", "t2r_lm"]),
    "gated": ("gated additive", ["--arch", "t2r_lm", "--t2r-decay", "gated"]),
    "delta": ("delta rule (DeltaNet)", ["--arch", "t2r_lm", "--t2r-update", "delta"]),
    "gated_delta": ("gated delta (Gated DeltaNet)", ["--arch", "t2r_lm", "--t2r-update", "delta",
                                                     "--t2r-decay", "gated"]),
    "window": ("softmax window + linear", ["--arch", "t2r_lm", "--t2r-window", "WINDOW"]),
    "softmax": ("softmax transformer_lm (upper bound)", ["--arch", "transformer_lm"]),
}


def make_line(rng: random.Random, n: int, length: int, num_keys: int, num_values: int) -> list:
    """One MQAR line of `length` tokens: n pairs `k v` with distinct keys, then (length - 2n) / 2 queries
    `k v`, each a key of the pairs (drawn with replacement) followed by its value."""
    if length % 2 or 2 * n >= length or n > num_keys:
        raise ValueError(f"need an even length > 2n and n <= keys (n={n}, length={length}, keys={num_keys})")
    keys = rng.sample(range(num_keys), n)
    value = {k: rng.randrange(num_values) for k in keys}
    queries = [rng.choice(keys) for _ in range(length // 2 - n)]
    return [w for k in keys + queries for w in (f"k{k}", f"v{value[k]}")]


def guess_from_line(line: str) -> float:
    """The accuracy of answering every query of a line with one of the values of its pairs, drawn at random:
    what a model scores that has learned that the answer is a value seen in the line, but not which one
    (about 1/N; values repeat, so a little more)."""
    words = line.split()
    keys = words[::2]
    n = next((i for i, k in enumerate(keys) if k in keys[:i]), len(keys))  # the first query ends the pairs
    return 1 / len(set(words[1:2 * n:2]))


def write_lines(path, lines):
    path.write_text("".join(" ".join(line) + "\n" for line in lines))


def make_data(work: pathlib.Path, a) -> dict:
    """Text and binarized data in work/: train (every N mixed, shuffled), valid (a small mixture, only for
    fairseq's bookkeeping) and test.N.txt per N (held out: drawn after, from the same generator). The
    dictionary is written first, so every key and value has an index whether or not it was drawn."""
    rng = random.Random(a.seed)
    draw = lambda n, count: [make_line(rng, n, a.length, a.keys, a.values) for _ in range(count)]  # noqa: E731
    train = [line for n in a.ns for line in draw(n, a.train_lines)]
    rng.shuffle(train)
    work.mkdir(parents=True, exist_ok=True)
    write_lines(work / "train.txt", train)
    write_lines(work / "valid.txt", [line for n in a.ns for line in draw(n, 2)])
    for n in a.ns:
        write_lines(work / f"test.{n}.txt", draw(n, a.test_lines))
    words = [f"k{i}" for i in range(a.keys)] + [f"v{i}" for i in range(a.values)]
    (work / "dict.txt").write_text("".join(f"{w} 1\n" for w in words))
    kit.run_or_exit(["fairseq-preprocess", "--only-source", "--srcdict", work / "dict.txt", "--trainpref",
                     work / "train.txt", "--validpref", work / "valid.txt", "--destdir", work / "bin", "--workers",
                     "1"], work / "preprocess.log")
    return {"train_lines": len(train), "test_lines_per_n": a.test_lines, "train_tokens": len(train) * (a.length + 1)}


def model_flags(a) -> list:
    return ["--decoder-layers", a.layers, "--decoder-embed-dim", a.dim, "--decoder-ffn-embed-dim", 2 * a.dim,
            "--decoder-attention-heads", a.heads, "--dropout", 0]


def form_flags(a, form) -> list:
    flags = [a.window if f == "WINDOW" else f for f in FORMS[form][1]]
    t2r = flags[1] != "transformer_lm"
    return ["--task", "t2r_language_modeling" if t2r else "language_modeling", *flags,
            *(["--t2r-feature-dim", a.feature_dim] if t2r else [])]


def train_flags(a, form, bin_dir) -> list:
    """The fairseq-train command (after its name) for one form: everything but form_flags is shared."""
    return [bin_dir, "--user-dir", PLUGIN, *form_flags(a, form), *shared_flags(a)]


def shared_flags(a) -> list:
    # One line per sample (eos mode); the block size only has to exceed a line.
    return [*model_flags(a), "--criterion", "recall_answers", "--sample-break-mode", "eos",
            "--tokens-per-sample", a.length + 8,
            "--batch-size", a.batch_size, "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", a.lr,
            "--lr-scheduler", "inverse_sqrt", "--warmup-updates", min(50, a.updates // 4), "--clip-norm", 1.0,
            "--max-update", a.updates, "--disable-validation", "--no-epoch-checkpoints",
            "--log-format", "simple", "--log-interval", 50, "--seed", a.seed,
            "--num-workers", 0]


def accuracy(logits, src_tokens, target, is_key):
    """(correct, answers): argmax of logits (batch, time, vocab) against target (batch, time) at the answer
    positions of src_tokens (batch, time) (see recall_plugin.answer_mask)."""
    from recall_plugin import answer_mask

    mask = answer_mask(src_tokens, is_key)
    return int((logits.argmax(-1) == target)[mask].sum()), int(mask.sum())


def load_plugin():
    """Register t2r_fairseq and the criterion the way fairseq-train does (one import, by --user-dir)."""
    from argparse import Namespace

    from fairseq import utils

    utils.import_user_module(Namespace(user_dir=str(PLUGIN)))


def evaluate(checkpoint, work, ns, batch=32) -> dict:
    """{N: accuracy} of the checkpoint on work/test.N.txt."""
    import torch
    from fairseq import checkpoint_utils

    load_plugin()
    from recall_plugin import key_table

    models, _, task = checkpoint_utils.load_model_ensemble_and_task([str(checkpoint)],
                                                                    arg_overrides={"data": str(work / "bin")})
    model, d = models[0].eval(), task.source_dictionary
    is_key = key_table(d)
    result = {}
    with torch.no_grad():
        for n in ns:
            lines = (work / f"test.{n}.txt").read_text().splitlines()
            correct = total = 0
            for start in range(0, len(lines), batch):
                tokens = torch.stack([d.encode_line(line, add_if_not_exist=False, append_eos=False).long()
                                      for line in lines[start:start + batch]])
                eos = torch.full((tokens.size(0), 1), d.eos())
                # As fairseq's language modeling feeds a line: eos first, each position predicting the next.
                src, target = torch.cat([eos, tokens], 1), torch.cat([tokens, eos], 1)
                c, t = accuracy(model(src)[0], src, target, is_key)
                correct, total = correct + c, total + t
            result[str(n)] = round(correct / total, 4)
    return result


def final_train_stats(text):
    """The last train_inner loss and accuracy fairseq-train printed."""
    import re

    found = re.findall(r"train_inner .*? loss=([0-9.]+), acc=([0-9.]+)", text)
    return {"final_train_loss": float(found[-1][0]), "final_train_acc": float(found[-1][1]) / 100} if found else {}


def goal_points(data) -> list:
    """The N at which additive T2R is below 50% and gated delta above 90% accuracy (the issue's question)."""
    if "additive" not in data or "gated_delta" not in data:
        return []
    add, gd = data["additive"]["accuracy"], data["gated_delta"]["accuracy"]
    return [int(n) for n in add if add[n] < 0.5 and gd.get(n, 0) > 0.9]


def table(data) -> str:
    """Accuracy per form (rows) and N (columns), from the results file."""
    forms = [f for f in FORMS if f in data]
    ns = sorted({int(n) for f in forms for n in data[f]["accuracy"]})
    lines = ["| form | options | " + " | ".join(f"N = {n}" for n in ns) + " | minutes to train |",
             "|---|---|" + "---:|" * (len(ns) + 1)]
    for f in forms:
        r = data[f]
        # The task and the feature size are every T2R form's: said once, in the setup line.
        options = " ".join(r["flags"][2:-2] if "--t2r-feature-dim" in r["flags"] else r["flags"][2:])
        lines.append(f"| {r['label']} | `{options}` | " + " | ".join(f"{100 * r['accuracy'][str(n)]:.1f}%" for n in ns)
                     + f" | {r['train_minutes']:.1f} |")
    if "guess" in data:
        lines.append(f"| {data['guess']['label']} | - | " + " | ".join(
            f"{100 * data['guess']['accuracy'][str(n)]:.1f}%" for n in ns) + " | - |")
    if "additive" in data and "gated_delta" in data:
        points = goal_points(data)
        lines += ["", f"Additive T2R below 50% and gated delta above 90% at N = {', '.join(map(str, points))}."
                  if points else "No N has additive T2R below 50% and gated delta above 90%."]
    return "\n".join(lines)


def plot_data(data) -> dict:
    """What the figure plots (kept in its PNG metadata, so docs.generate can check it without pixels)."""
    return {f: {"label": data[f]["label"], "accuracy": data[f]["accuracy"]} for f in (*FORMS, "guess") if f in data}


def plot(data, path):
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    points = plot_data(data)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for f, p in points.items():
        ns = sorted(int(n) for n in p["accuracy"])
        ax.plot(ns, [100 * p["accuracy"][str(n)] for n in ns], marker="o",
                linestyle={"softmax": "--", "guess": ":"}.get(f, "-"), color="gray" if f == "guess" else None,
                label=p["label"])
    ax.set(xscale="log", xlabel="key-value pairs N", ylabel="answer accuracy (%)", ylim=(-2, 102),
           title="Multi-query associative recall")
    ax.set_xticks(sorted({int(n) for p in points.values() for n in p["accuracy"]}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"t2r-data": json.dumps(points)})
    plt.close(fig)


def setup_line(data) -> str:
    """How the rows were made, in a sentence or two (under the table here and in results/README.md)."""
    s, m = data["setup"], data["setup"]["machine"]
    return (f"{s['model']}; {s['data']}; {s['training']}. Accuracy: argmax at every answer of the held-out lines. "
            f"{m['cpu']}, {m['cores']} cores, next to other work (1-minute load average {m['load_average'][0]:.2f} "
            f"when the last row ended), {s['date']}.")


def write_reports(data, out: pathlib.Path):
    notes = f"\n\nWhat was tried: {data['setup']['notes']}" if data["setup"].get("notes") else ""
    (out / "recall.md").write_text(f"# Multi-query associative recall\n\n`{data['setup']['command']}`\n\n"
                                   f"{table(data)}\n\n{setup_line(data)}{notes}\n")
    plot(data, out / "recall.png")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.recall", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    p.add_argument("--forms", default=",".join(FORMS), help=f"comma-separated subset of {', '.join(FORMS)}")
    p.add_argument("--out", type=pathlib.Path, default=ROOT / "results", help="results directory")
    p.add_argument("--work", type=pathlib.Path, default=None, help="data and checkpoints (default: runs/recall, "
                   "or <out>/recall_work with --quick)")
    p.add_argument("--force", default="", help="comma-separated forms to rerun though recorded")
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run: tiny data, model and updates")
    p.add_argument("--ns", type=ints, default=[8, 16, 32, 64, 128], help="numbers of key-value pairs")
    p.add_argument("--length", type=int, default=512, help="tokens per line")
    p.add_argument("--keys", type=int, default=128, help="distinct keys")
    p.add_argument("--values", type=int, default=128, help="distinct values")
    p.add_argument("--train-lines", type=int, default=2000, help="training lines per N")
    p.add_argument("--test-lines", type=int, default=200, help="held-out lines per N")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dim", type=int, default=64, help="embedding size (ffn: twice it)")
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--feature-dim", type=int, default=32, help="T2R feature size k per head, for every form")
    p.add_argument("--window", type=int, default=32, help="softmax window of the window form")
    p.add_argument("--updates", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=16, help="lines per update")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--notes", default="", help="a note kept in the setup row (what was tried)")
    a = p.parse_args(argv)
    import logging
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq's loaders turn on debug chatter
    if a.quick:
        a.ns, a.length, a.keys, a.values, a.train_lines, a.test_lines = [2, 4], 16, 8, 8, 16, 4
        a.dim, a.heads, a.feature_dim, a.window, a.updates, a.batch_size = 16, 2, 4, 4, 4, 4
    forms = [f for f in a.forms.split(",") if f]
    work = a.work or (a.out / "recall_work" if a.quick else ROOT / "runs" / "recall")
    command = shlex.join(["python", "-m", "benchmarks.recall", *(sys.argv[1:] if argv is None else map(str, argv))])
    results = kit.Results(a.out / "recall.json")
    force = {f for f in a.force.split(",") if f}
    sizes = {}
    if any(f not in results.load() or f in force for f in forms):  # a rerun with every row recorded needs no data
        kit.log(f"data: {len(a.ns)} values of N, {a.train_lines} training lines each, L = {a.length}, into {work}")
        sizes = make_data(work, a)

    def run_row(form):
        cmd = train_flags(a, form, work / "bin")
        save = work / form
        kit.log(f"{form}: training ({a.updates} updates)")
        text, train_minutes = kit.train_fresh(cmd, save, work / f"{form}.log")
        start = time.time()
        accuracy_per_n = evaluate(save / "checkpoint_last.pt", work, a.ns)
        label = FORMS[form][0].replace("window", f"window {a.window}")
        return {"label": label, "flags": [str(f) for f in form_flags(a, form)],
                "accuracy": accuracy_per_n, "train_minutes": round(train_minutes, 2),
                "eval_minutes": round((time.time() - start) / 60, 2), **final_train_stats(text),
                "load_average_end": round(kit.load_average(), 2)}

    def setup():
        return {"command": command, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "machine": kit.machine(),
                "model": f"{a.layers} layers x {a.dim} (ffn {2 * a.dim}, {a.heads} heads), T2R feature size "
                         f"{a.feature_dim} per head for every form, window {a.window}",
                "data": f"L = {a.length} tokens per line, N in {a.ns}, {a.keys} keys and {a.values} values; "
                        f"{sizes['train_lines']} training lines (the N mixed), {a.test_lines} held-out lines per N",
                "training": f"{a.updates} updates of {a.batch_size} lines, Adam lr {a.lr} (inverse square root "
                            "decay after 50 warmup updates), loss on the answers only (criterion recall_answers), "
                            "one thread",
                "updates": a.updates, "sizes": sizes,
                "train_command": f"fairseq-train {work / 'bin'} --user-dir {PLUGIN} <form's flags> "
                                 + " ".join(str(x) for x in shared_flags(a)),
                "notes": a.notes}

    if all((work / f"test.{n}.txt").exists() for n in a.ns):  # the reference needs no model: from the test lines
        guess = {str(n): round(sum(map(guess_from_line, lines)) / len(lines), 4)
                 for n in a.ns for lines in [(work / f"test.{n}.txt").read_text().splitlines()]}
        results.record("guess", {"label": "reference: a value of the line, at random", "accuracy": guess})
    results.run_rows(forms, FORMS, force, run_row, setup)
    write_reports(results.load(), a.out)
    print(table(results.load()))


if __name__ == "__main__":
    main()
