"""`make demo`: swap-then-finetune on CPU in a few minutes (results/README.md has a measured run), no download.

    python -m examples.demo [--data DIR] [--out runs/demo] [size knobs, see --help]

1. corpus: Python's reference docs (`pydoc_data.topics`), or your own raw text (--data);
2. sentencepiece BPE, then `fairseq-preprocess --only-source`;
3. `fairseq-train` a small softmax `transformer_lm` (the "pretrained transformer");
4. `fairseq-train --task t2r_language_modeling --convert-from <softmax checkpoint> --arch t2r_lm`:
   swap its attention for T2R and finetune; the fair baseline: the softmax model trained on for the
   same number of updates (`--finetune-from-model`); and, for contrast, the same T2R model from
   random init for those updates;
5. score every model with `fairseq-eval-lm`, and the swapped model before any finetuning (what
   `t2r-convert` writes);
6. generation cost as the prefix grows, through fairseq's incremental decoding (measured as
   `make bench` does, benchmarks/decode.py);
7. `report.md`, `decode_time.png`, `ppl_vs_updates.png` in --out.

Every fairseq command is logged (command line first) to <out>/logs/<name>.log.
"""
import argparse
import json
import math
import os
import pathlib
import platform
import re
import resource
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from tools import kit

from . import demo_data
from .demo_report import write_report

ROOT = pathlib.Path(__file__).resolve().parents[1]
USER_DIR = ROOT / "t2r_fairseq"
# How many steps main() runs, for the "[k/N]" progress lines.
STEPS = 10
NEVER = 10 ** 9  # an epoch interval that never comes: validate/save by update count only


class DemoError(RuntimeError):
    """A step failed; the message is the one line the user sees."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m examples.demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", help="directory of raw text: train.txt/valid.txt/test.txt or WikiText-style "
                                  "wiki.{train,valid,test}.tokens (default: Python's reference docs)")
    p.add_argument("--out", default="runs/demo", help="output directory (its demo outputs are overwritten)")
    size = p.add_argument_group("sizes (defaults: a few minutes on 2 CPU cores; results/README.md has a measured run)")
    size.add_argument("--vocab-size", type=int, default=2000, help="sentencepiece BPE vocabulary")
    size.add_argument("--layers", type=int, default=2)
    size.add_argument("--embed-dim", type=int, default=128, help="model width; FFN is 4x")
    size.add_argument("--heads", type=int, default=4)
    size.add_argument("--feature-dim", type=int, default=32, help="T2R feature size per head (--t2r-feature-dim)")
    size.add_argument("--tokens-per-sample", type=int, default=128, help="training block length")
    size.add_argument("--max-tokens", type=int, default=2048, help="tokens per batch")
    size.add_argument("--pretrain-updates", type=int, default=500, help="softmax pretraining updates")
    size.add_argument("--finetune-updates", type=int, default=200,
                      help="updates after pretraining: swap-then-finetune, the softmax model trained on, "
                           "and T2R from random init")
    size.add_argument("--validations", type=int, default=10, help="validations per finetuning run (the curve)")
    size.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of every run")
    size.add_argument("--dropout", type=float, default=0.1)
    size.add_argument("--max-prefix", type=int, default=4096, help="longest prefix in the decoding benchmark")
    size.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    if args.tokens_per_sample > args.max_tokens:
        p.error("--max-tokens must be at least --tokens-per-sample")
    return args


class Progress:
    """One line per step with the time since the demo started."""

    def __init__(self):
        self.start = time.time()
        self.step = 0
        self.lines = []  # the transcript, saved as console.txt

    def print(self, line: str):
        self.lines.append(line)
        print(line, flush=True)

    def begin(self, text: str):
        self.step += 1
        self.step_start = time.time()
        self.print(f"[{self.step}/{STEPS}] {text}")

    def note(self, text: str):
        self.print(f"      {text}")

    def end(self, text: str = "") -> float:
        seconds = time.time() - self.step_start
        took = f"{seconds:.0f}s" if seconds < 60 else kit.minutes(seconds)
        self.note(f"{text + '; ' if text else ''}took {took} (elapsed {kit.minutes(time.time() - self.start)})")
        return seconds


def run(name: str, cmd: list, logs: pathlib.Path, progress: Progress, on_line=None) -> str:
    """Run a console command, logging its output to logs/<name>.log with the command line on top.
    Returns the output; on failure prints its last lines and raises."""
    try:
        return kit.run_logged(cmd, logs / f"{name}.log", on_line=on_line)
    except kit.CommandFailed as e:
        for line in e.tail.splitlines():
            progress.note("| " + line)
        raise DemoError(f"{name}: {e}") from None


# -- fairseq command lines --------------------------------------------------------------------
def model_options(a) -> list:
    # transformer_lm's input/output dims default to 512 whatever the width: pin them to it.
    # Sinusoidal positions (transformer_lm's default) extend past the training block length;
    # max-target-positions only has to admit the longest decoding benchmark prefix.
    return ["--decoder-layers", a.layers, "--decoder-embed-dim", a.embed_dim,
            "--decoder-input-dim", a.embed_dim, "--decoder-output-dim", a.embed_dim,
            "--decoder-ffn-embed-dim", 4 * a.embed_dim, "--decoder-attention-heads", a.heads,
            "--share-decoder-input-output-embed", "--dropout", a.dropout,
            "--max-target-positions", max(a.tokens_per_sample, a.max_prefix + 1)]


def train_command(a, data_bin, save_dir, updates: int, valid_every: int, extra: list) -> list:
    return ["fairseq-train", data_bin, "--user-dir", USER_DIR, *model_options(a), *extra,
            "--tokens-per-sample", a.tokens_per_sample, "--max-tokens", a.max_tokens,
            "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--weight-decay", "0.01", "--clip-norm", "1.0",
            # A short run ends best with the learning rate decayed to zero (linear after warmup).
            "--lr", a.lr, "--lr-scheduler", "polynomial_decay", "--warmup-updates", max(1, updates // 10),
            "--total-num-update", updates,
            "--max-update", updates, "--validate-interval-updates", valid_every, "--validate-interval", NEVER,
            # Save only at the end: checkpoint_best.pt is then the final model.
            "--save-interval", NEVER, "--no-epoch-checkpoints", "--save-dir", save_dir,
            "--log-format", "json", "--log-interval", max(1, valid_every // 2),
            "--num-workers", 0, "--seed", a.seed]


VALID_LINE = re.compile(r"\| valid \| (\{.*\})")


def valid_curve(log_text: str) -> list:
    """[(num_updates, valid ppl)] from fairseq-train's json valid lines, one point per update count."""
    points = {}
    for match in VALID_LINE.finditer(log_text):
        stats = json.loads(match.group(1))
        points[int(stats["valid_num_updates"])] = float(stats["valid_ppl"])
    return sorted(points.items())


# -- the pipeline ----------------------------------------------------------------------------
def prepare_output(out: pathlib.Path):
    """Remove only what earlier demo runs wrote (fairseq-train would resume from a stale
    checkpoint_last.pt), never anything else a user keeps in --out."""
    for sub in ("data", "checkpoints", "logs"):
        shutil.rmtree(out / sub, ignore_errors=True)
    for name in ("report.md", "results.json", "console.txt", "decode_time.png", "ppl_vs_updates.png"):
        (out / name).unlink(missing_ok=True)
    for sub in ("data", "checkpoints", "logs"):
        (out / sub).mkdir(parents=True)


def corpus_step(a, out, progress):
    if a.data:
        raw = demo_data.find_raw_splits(a.data)
        progress.begin(f"corpus: your text in {a.data}")
    else:
        progress.begin("corpus: Python's reference documentation (pydoc_data.topics, shipped with Python)")
        raw = demo_data.write_pydoc_splits(out / "data" / "raw")
    words = {s: demo_data.count_words(p) for s, p in raw.items()}
    if not words["train"] or not words["valid"] or not words["test"]:
        raise DemoError(f"empty split(s): {', '.join(s for s, n in words.items() if not n)}")
    progress.end(", ".join(f"{s} {n:,} words" for s, n in words.items()))
    return raw


def binarize_step(a, raw, out, progress):
    progress.begin(f"sentencepiece BPE ({a.vocab_size} pieces), then fairseq-preprocess --only-source")
    bpe = out / "data" / "bpe"
    bpe.mkdir()
    try:
        # Large user corpora (WikiText-103) would take minutes to learn on: a sample is plenty.
        spm_model = kit.learn_bpe(raw["train"], bpe / "spm", a.vocab_size, input_sentence_size=300_000)
    except RuntimeError as e:  # sentencepiece's own message, e.g. vocabulary too large for the text
        raise DemoError(f"sentencepiece: {str(e).strip().splitlines()[-1]}") from None
    tokens = {s: kit.encode_bpe(spm_model, raw[s], bpe / f"{s}.bpe") for s in demo_data.SPLITS}
    data_bin = out / "data" / "bin"
    run("preprocess", ["fairseq-preprocess", "--only-source", "--trainpref", bpe / "train.bpe",
                       "--validpref", bpe / "valid.bpe", "--testpref", bpe / "test.bpe",
                       "--destdir", data_bin, "--workers", 1], out / "logs", progress)
    progress.end(", ".join(f"{s} {n:,} tokens" for s, n in tokens.items()))
    return data_bin


def train_step(a, title, name, data_bin, out, progress, updates, extra):
    progress.begin(f"{title}: {updates} updates (log: {out / 'logs' / (name + '.log')})")
    save_dir = out / "checkpoints" / name

    def report_validation(line):
        for n, ppl in valid_curve(line):
            progress.note(f"update {n}/{updates}: valid ppl {ppl:.1f}")

    valid_every = max(1, updates // a.validations)
    cpu_before = children_cpu_seconds()
    log = run(name, train_command(a, data_bin, save_dir, updates, valid_every, extra), out / "logs", progress,
              on_line=report_validation)
    seconds = progress.end()
    return {"checkpoint": save_dir / "checkpoint_best.pt", "updates": updates, "train_seconds": seconds,
            "train_cpu_seconds": children_cpu_seconds() - cpu_before, "curve": valid_curve(log)}


def children_cpu_seconds() -> float:
    """CPU time of finished subprocesses: much less affected than wall time by other work on the machine."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def swap_step(a, softmax_run, out, progress):
    """The swapped model before any finetuning: the update-0 point of the finetuning curve."""
    progress.begin("swap attention for T2R, no finetuning (t2r_fairseq.convert, as `t2r-convert` does)")
    import_fairseq()
    from t2r_fairseq.checkpoints import CheckpointError
    from t2r_fairseq.convert import convert_checkpoint

    swapped = out / "checkpoints" / "t2r_swapped.pt"
    try:
        new_keys = convert_checkpoint(str(softmax_run["checkpoint"]), str(swapped), t2r_feature_dim=a.feature_dim)
    except CheckpointError as e:
        raise DemoError(f"conversion failed: {e}") from None
    progress.end(f"{swapped}: softmax weights reused, {len(new_keys)} new feature-map tensors")
    return {"checkpoint": swapped, "updates": 0, "train_seconds": None, "train_cpu_seconds": None, "curve": []}


def score_step(a, runs, data_bin, out, progress):
    progress.begin("score every model with fairseq-eval-lm (valid and test)")
    jobs = [(name, split) for name in runs for split in ("valid", "test")]

    def score(job):
        name, split = job
        output = run(f"eval_{name}_{split}", [
            "fairseq-eval-lm", data_bin, "--path", runs[name]["checkpoint"], "--user-dir", USER_DIR,
            "--gen-subset", split, "--tokens-per-sample", a.tokens_per_sample, "--max-tokens", a.max_tokens,
            "--num-workers", 0], out / "logs", progress)
        try:
            return kit.perplexity(output)
        except ValueError:
            raise DemoError(f"fairseq-eval-lm ({name} {split}) printed no perplexity") from None

    # Each fairseq-eval-lm spends most of its time importing fairseq, on one core: run them side by side.
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        for (name, split), ppl in zip(jobs, pool.map(score, jobs)):
            runs[name][f"{split}_ppl"] = ppl
    for name, r in runs.items():
        progress.note(f"{name}: valid ppl {r['valid_ppl']:.2f}, test ppl {r['test_ppl']:.2f}")
    progress.end()


def prefix_lengths(max_prefix: int, start: int = 64) -> list:
    """start, 2 * start, ... up to max_prefix (max_prefix itself always included)."""
    lengths, length = [], min(start, max_prefix)
    while length < max_prefix:
        lengths.append(length)
        length *= 2
    return lengths + [max_prefix]


def load_lm(path):
    """A checkpoint as any fairseq user loads it (fairseq's own loader), in eval mode on CPU."""
    from fairseq import checkpoint_utils

    models, _ = checkpoint_utils.load_model_ensemble([str(path)])
    return models[0].eval()


def decode_step(a, runs, progress):
    import_fairseq()
    import torch

    from benchmarks.decode import decode_rows

    lengths = prefix_lengths(a.max_prefix)
    progress.begin(f"generation cost per token after prefixes of {lengths[0]}..{lengths[-1]} tokens "
                   f"(batch 1, 1 thread, fairseq incremental decoding)")
    # One sequence gains nothing from intra-op threads, and one thread keeps timings steady on a
    # machine that also runs other work.
    torch.set_num_threads(1)
    models = {"softmax": load_lm(runs["softmax"]["checkpoint"]), "t2r": load_lm(runs["t2r_converted"]["checkpoint"])}
    # make bench's measurement: prefill, then time single-token steps, the kv cache put back to L each time.
    rows = decode_rows(models, lengths, [1], vocab=len(models["softmax"].decoder.dictionary), seconds=1.0,
                       log=progress.note)
    progress.end()
    # step_s is the step's CPU time on one thread: on an idle core the same as wall time, and on a
    # shared machine it leaves out the time spent waiting for a core.
    return {name: [{"prefix": r["length"], "ms_per_token": 1000 * r["step_s"], "wall_ms_per_token": 1000 * r["wall_s"],
                    "state_bytes": r["state_bytes"]} for r in rows if r["model"] == name] for name in models}


def import_fairseq():
    """Import fairseq (and register t2r_fairseq) in this process with a quiet console: fairseq
    modules call logging.basicConfig (one at DEBUG level) on import, which is a no-op once the root
    logger is configured."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    import t2r_fairseq  # noqa: F401


def main(argv=None) -> int:
    a = parse_args(argv)
    # The decode measurement uses torch.profiler, whose C++ side prints status lines to stderr;
    # both are read when torch loads, which in this process is later.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    out = pathlib.Path(a.out)
    progress = Progress()
    load_start = os.getloadavg()[0]
    try:
        if a.data:  # a bad --data fails before anything is deleted
            demo_data.find_raw_splits(a.data)
            data = pathlib.Path(a.data).resolve()
            if (out / "data").resolve() in (data, *data.parents):
                raise DemoError(f"--data {a.data} is inside {out / 'data'}, which the demo clears first")
        prepare_output(out)
        raw = corpus_step(a, out, progress)
        data_bin = binarize_step(a, raw, out, progress)
        runs = {"softmax": train_step(a, "pretrain a softmax transformer_lm", "softmax", data_bin, out, progress,
                                      a.pretrain_updates, ["--task", "language_modeling", "--arch", "transformer_lm"])}
        runs["softmax_continued"] = train_step(
            a, "fair baseline: the softmax model trained on for the finetuning budget", "softmax_continued",
            data_bin, out, progress, a.finetune_updates,
            ["--task", "language_modeling", "--arch", "transformer_lm",
             "--finetune-from-model", runs["softmax"]["checkpoint"]])
        runs["t2r_swapped"] = swap_step(a, runs["softmax"], out, progress)
        runs["t2r_converted"] = train_step(
            a, "swap attention for T2R (--convert-from) and finetune", "t2r_converted", data_bin, out, progress,
            a.finetune_updates, ["--task", "t2r_language_modeling", "--arch", "t2r_lm",
                                 "--t2r-feature-dim", a.feature_dim, "--convert-from", runs["softmax"]["checkpoint"]])
        runs["t2r_random"] = train_step(
            a, "for contrast: the same T2R model from random init", "t2r_random", data_bin, out, progress,
            a.finetune_updates, ["--task", "t2r_language_modeling", "--arch", "t2r_lm",
                                 "--t2r-feature-dim", a.feature_dim])
        score_step(a, runs, data_bin, out, progress)
        decoding = decode_step(a, runs, progress)
        progress.begin(f"report: {out / 'report.md'}, {out / 'decode_time.png'}, {out / 'ppl_vs_updates.png'}")
        machine = {"cpu": kit.cpu_model(), "cpus": os.cpu_count(), "platform": platform.platform(),
                   "python": platform.python_version(), "wall_seconds": time.time() - progress.start,
                   "cpu_seconds": children_cpu_seconds() + sum(os.times()[:2]),
                   "load_average_start": load_start, "load_average_end": os.getloadavg()[0]}
        table = write_report(out, a, runs, decoding, machine)
        progress.end()
        (out / "console.txt").write_text("\n".join(progress.lines) + "\n")
    except (DemoError, demo_data.DataError, OSError) as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, demo_data.DataError) else 1
    except KeyboardInterrupt:
        print("demo: interrupted", file=sys.stderr)
        return 130
    print()
    print(table)
    print(f"\nWhole demo: {kit.minutes(machine['wall_seconds'])} wall, {kit.minutes(machine['cpu_seconds'])} CPU time "
          f"on {machine['cpus']} CPUs (1-minute load average {machine['load_average_start']:.1f} at the start). "
          f"Report and plots: {out}/")
    if not all(math.isfinite(r["test_ppl"]) for r in runs.values()):
        print("demo: warning: a perplexity is not finite; see the logs in " + str(out / "logs"), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
