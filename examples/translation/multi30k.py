"""Swap-then-finetune on Multi30k (EN-DE image captions) at CPU scale.

    python -m examples.translation.multi30k ../shared/data/multi30k

Rows: a softmax transformer teacher; the teacher trained on for the finetuning budget
(`teacher_continued`, the fair baseline when the teacher has not converged); T2R converted from it
with `--task t2r_translation --convert-from` and finetuned for that budget: plain (the paper's),
with a softmax window in decoder self-attention (`t2r_window`), with attention transfer of the
decoder self- and cross-attention first (`t2r_transfer`), both (`t2r_window_transfer`), the window
with attention transfer and a KL term towards the teacher's next-token distribution from the first
update (`t2r_window_distill`), and T2R self-attention with softmax cross-attention kept
(`t2r_softmax_cross`); ELU+1 on request (`--rows elu_pretrain`); cross-attention with its own
feature size or map, alone or with attention transfer from the first update (`--rows t2r_cross64,
t2r_cross128,t2r_cross_hedgehog,t2r_cross_transfer,t2r_cross_only_transfer`). Each row: detokenized sacreBLEU on
test_2016_flickr (beam 5) and fairseq-generate's own sentences/s (best of interleaved repeats).
Results accumulate in results/multi30k.json after every row, so an interrupted run continues
where it stopped (`--force ROW` reruns one).

Text goes through one joint sentencepiece BPE model (no Moses tokenization), so fairseq-generate
`--remove-bpe sentencepiece` gives detokenized text that sacreBLEU scores against the raw
references. Every size is a flag; a test runs this script with a few hundred sentences.
"""
import argparse
import datetime
import os
import pathlib
import re
import shlex
import sys

from tools import kit
from tools.kit import log

ROOT = pathlib.Path(__file__).resolve().parents[2]

USER_DIR = str(ROOT / "t2r_fairseq")
SPLITS = {"train": "train", "valid": "val", "test": "test_2016_flickr"}


def sh(cmd, log_path, commands):
    """kit.run_or_exit, the command line also listed in the results' set-up."""
    commands.append(shlex.join(str(c) for c in cmd))
    return kit.run_or_exit(cmd, log_path)


def read_lines(path, limit=None):
    lines = path.read_text(encoding="utf-8").splitlines()
    return lines[:limit] if limit else lines


def prepare(args, commands):
    """Joint sentencepiece BPE on both sides of train, encode, fairseq-preprocess --joined-dictionary."""
    work, bin_dir = args.work, args.work / "bin"
    if (bin_dir / f"dict.{args.src}.txt").exists():
        return bin_dir
    spm_dir = work / "spm"
    spm_dir.mkdir(parents=True, exist_ok=True)
    limits = {"train": args.train_lines, "valid": args.valid_lines, "test": args.test_lines}
    joint = spm_dir / "train.joint"
    joint.write_text("\n".join(read_lines(args.data / f"train.{args.src}", args.train_lines)
                               + read_lines(args.data / f"train.{args.tgt}", args.train_lines)) + "\n",
                     encoding="utf-8")
    log(f"sentencepiece BPE, joint vocabulary {args.vocab}")
    # A tiny corpus cannot fill a large vocabulary; hard_vocab_limit=False takes what there is.
    model = kit.learn_bpe(joint, spm_dir / "spm", args.vocab, hard_vocab_limit=False)
    commands.append(f"sentencepiece: spm_train --model_type bpe --vocab_size {args.vocab} "
                    f"--character_coverage 1.0 on train.{args.src} + train.{args.tgt}")
    for split, name in SPLITS.items():
        for lang in (args.src, args.tgt):
            kit.encode_bpe(model, args.data / f"{name}.{lang}", spm_dir / f"{split}.{lang}", limit=limits[split])
    log("fairseq-preprocess --joined-dictionary")
    sh(["fairseq-preprocess", "--source-lang", args.src, "--target-lang", args.tgt, "--trainpref",
        spm_dir / "train", "--validpref", spm_dir / "valid", "--testpref", spm_dir / "test", "--destdir", bin_dir,
        "--joined-dictionary", "--workers", "2"], work / "logs/preprocess.log", commands)
    return bin_dir


def model_args(args):
    return ["--encoder-layers", args.layers, "--decoder-layers", args.layers, "--encoder-embed-dim", args.embed_dim,
            "--decoder-embed-dim", args.embed_dim, "--encoder-ffn-embed-dim", args.ffn_dim,
            "--decoder-ffn-embed-dim", args.ffn_dim, "--encoder-attention-heads", args.heads,
            "--decoder-attention-heads", args.heads, "--share-all-embeddings", "--dropout", args.dropout]


def train_args(args, updates, lr, warmup):
    # A fixed number of updates and no wall-clock cap, so that a row does not depend on the load.
    return ["--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--clip-norm", "0.0", "--lr", lr,
            "--lr-scheduler", "inverse_sqrt", "--warmup-updates", warmup, "--warmup-init-lr", "1e-07",
            "--weight-decay", "0.0001", "--label-smoothing", "0.1", "--max-tokens", args.max_tokens,
            "--max-update", updates, "--cpu", "--num-workers", "0", "--log-format", "simple", "--log-interval", "50",
            "--no-epoch-checkpoints", "--seed", "1"]


def generate(args, bin_dir, checkpoint, name, commands):
    """Beam-5 fairseq-generate on the test split -> (detokenized hypotheses in order, sentences/s)."""
    text = sh(["fairseq-generate", bin_dir, "--user-dir", USER_DIR, "--path", checkpoint, "--gen-subset", "test",
               "--beam", "5", "--batch-size", args.gen_batch_size, "--remove-bpe", "sentencepiece", "--cpu",
               # fairseq drops a last batch that is not a multiple of this (default 8): keep every sentence.
               "--required-batch-size-multiple", "1",
               # Untrained (tiny test) models would otherwise babble for 200 tokens.
               "--max-len-a", "1.2", "--max-len-b", "10"], args.work / f"logs/{name}.generate.log", commands)
    hyps = dict(re.findall(r"^D-(\d+)\t\S+\t(.*)$", text, flags=re.M))
    n = len(read_lines(args.data / f"{SPLITS['test']}.{args.src}", args.test_lines))
    if len(hyps) != n:
        sys.exit(f"{name}: fairseq-generate produced {len(hyps)} hypotheses for {n} test sentences")
    speed = re.findall(r"Translated ([\d,]+) sentences .* \(([0-9.]+) sentences/s", text)
    return [hyps[str(i)] for i in range(n)], float(speed[-1][1])


def row_options(args, teacher_ckpt):
    """name: fairseq-train options. The teacher trains from scratch; every other row gets the same
    finetuning budget from it."""
    task = ["--task", "translation", "--source-lang", args.src, "--target-lang", args.tgt]
    t2r = ["--user-dir", USER_DIR, "--task", "t2r_translation", "--source-lang", args.src, "--target-lang", args.tgt,
           "--arch", "t2r_transformer", "--t2r-feature-dim", args.feature_dim, "--convert-from", teacher_ckpt]
    softmax = ["--criterion", "label_smoothed_cross_entropy"]
    window = ["--t2r-window", args.window]
    cross = ["--t2r-cross-feature-dim", args.cross_feature_dim]
    # Attention transfer (decoder self- and cross-attention) for the first updates, then everything
    # on the label-smoothed cross-entropy: the criterion replaces label_smoothed_cross_entropy.
    transfer = ["--criterion", "t2r_attention_transfer", "--attention-transfer-only-updates",
                args.transfer_only_updates]
    return {
        "teacher": task + ["--arch", "transformer"] + softmax,
        # The teacher trained on, softmax all along, for as many updates as every T2R finetuning:
        # that is extra training too, so on a teacher that has not converged this is the fair baseline.
        # (--user-dir only so that torch's safe loading accepts the fairseq checkpoint, see checkpoints.py)
        "teacher_continued": task + ["--user-dir", USER_DIR, "--arch", "transformer", "--finetune-from-model",
                                     teacher_ckpt] + softmax,
        "t2r_pretrain": t2r + softmax,
        "t2r_window": t2r + window + softmax,
        "t2r_transfer": t2r + transfer,
        "t2r_window_transfer": t2r + window + transfer,
        # Both distillation terms from the first update (no transfer-only phase: those updates are
        # taken from cross-entropy training): attention transfer and KL to the teacher's next-token
        # distribution.
        "t2r_window_distill": t2r + window + ["--criterion", "t2r_attention_transfer", "--distill-kl-weight",
                                              args.kl_weight],
        # Where the gap comes from: T2R self-attention with softmax cross-attention kept.
        "t2r_softmax_cross": t2r + ["--t2r-cross-attention", "softmax"] + softmax,
        "elu_pretrain": t2r + ["--t2r-feature-map", "elu"] + softmax,
        # Cross-attention's own features (issue 24): its state is built once per sentence, so a larger
        # k costs k x d per step and nothing per source token; Hedgehog's map can make alignments spiky.
        "t2r_cross64": t2r + ["--t2r-cross-feature-dim", 64] + softmax,
        "t2r_cross128": t2r + ["--t2r-cross-feature-dim", 128] + softmax,
        "t2r_cross_hedgehog": t2r + ["--t2r-cross-feature-map", "hedgehog"] + softmax,
        # The larger cross features with attention transfer from the first update (no transfer-only
        # phase): of every T2R attention, or of cross-attention alone.
        "t2r_cross_transfer": t2r + cross + ["--criterion", "t2r_attention_transfer"],
        "t2r_cross_only_transfer": t2r + cross + ["--criterion", "t2r_attention_transfer",
                                                  "--attention-transfer-modules", "cross"],
    }


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m examples.translation.multi30k", description=__doc__.split("\n\n")[0])
    p.add_argument("data", nargs="?", type=pathlib.Path, default=ROOT.parent / "shared/data/multi30k",
                   help="Multi30k folder with train/val/test_2016_flickr .en/.de (default: %(default)s)")
    p.add_argument("--data", dest="data_flag", type=pathlib.Path, default=None, help="same as the positional")
    p.add_argument("--work", type=pathlib.Path, default=ROOT / "runs/multi30k")
    p.add_argument("--results", type=pathlib.Path, default=ROOT / "results/multi30k.json")
    p.add_argument("--src", default="en")
    p.add_argument("--tgt", default="de")
    p.add_argument("--train-lines", type=int, default=None, help="use only the first N training pairs")
    p.add_argument("--valid-lines", type=int, default=None)
    p.add_argument("--test-lines", type=int, default=None)
    p.add_argument("--vocab", type=int, default=4000, help="joint sentencepiece BPE vocabulary")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--embed-dim", type=int, default=128)
    p.add_argument("--ffn-dim", type=int, default=512)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--feature-dim", type=int, default=32, help="T2R feature size per head")
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--teacher-updates", type=int, default=3000)
    p.add_argument("--finetune-updates", type=int, default=800, help="updates of every row trained from the teacher")
    p.add_argument("--window", type=int, default=64, help="--t2r-window of the window rows")
    p.add_argument("--transfer-only-updates", type=int, default=200,
                   help="--attention-transfer-only-updates of the transfer rows")
    p.add_argument("--kl-weight", type=float, default=0.5, help="--distill-kl-weight of t2r_window_distill")
    p.add_argument("--cross-feature-dim", type=int, default=128,
                   help="--t2r-cross-feature-dim of t2r_cross_transfer and t2r_cross_only_transfer")
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--gen-batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process: on a shared CPU one thread measured 2-7x faster per update "
                        "than two (spin-waiting threads)")
    p.add_argument("--rows", default="teacher,teacher_continued,t2r_pretrain,t2r_window,t2r_transfer,"
                           "t2r_window_transfer,t2r_window_distill,t2r_softmax_cross",
                   help="comma-separated rows to run")
    p.add_argument("--speed-repeats", type=int, default=2,
                   help="after training, time every model's generation this many more times (interleaved)")
    p.add_argument("--force", default="", help="comma-separated rows to rerun even if recorded")
    args = p.parse_args(argv)
    args.data = args.data_flag or args.data
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    for name in SPLITS.values():
        for lang in (args.src, args.tgt):
            if not (args.data / f"{name}.{lang}").is_file():
                sys.exit(f"error: {args.data} has no {name}.{lang} (pass the Multi30k folder as the first argument)")
    return args


def main(argv=None):
    args = parse_args(argv)
    import sacrebleu

    store = kit.Results(args.results)
    results = store.load()
    # Commands of rows recorded by an earlier invocation stay listed.
    commands = list(results.get("setup", {}).get("commands", []))
    commands.append(f"python -m examples.translation.multi30k {shlex.join(argv if argv is not None else sys.argv[1:])}")
    bin_dir = prepare(args, commands)
    references = read_lines(args.data / f"{SPLITS['test']}.{args.tgt}", args.test_lines)
    teacher_ckpt = args.work / "teacher/checkpoint_last.pt"
    rows = row_options(args, teacher_ckpt)

    def run_row(name):
        extra = rows[name]
        updates, lr = (args.teacher_updates, args.lr) if name == "teacher" else (args.finetune_updates,
                                                                                 args.finetune_lr)
        if name != "teacher" and not teacher_ckpt.exists():
            sys.exit(f"error: {name} starts from the teacher; run the teacher row first ({teacher_ckpt} is missing)")
        save = args.work / name
        log(f"{name}: fairseq-train, {updates} updates")
        # Finetuning starts from trained weights: a short warmup only protects the new feature maps.
        warmup = min(args.warmup if name == "teacher" else args.warmup // 3, max(1, updates // 5))
        text, minutes = kit.train_fresh([bin_dir, *extra, *model_args(args), *train_args(args, updates, lr, warmup)],
                                        save, args.work / f"logs/{name}.train.log",
                                        lambda cmd, log_path: sh(cmd, log_path, commands))
        done = re.findall(r"num_updates[ =](\d+)", text)
        valid = re.findall(r"valid on 'valid' subset \| loss ([0-9.]+) \| nll_loss ([0-9.]+)", text)
        hyps, speed = generate(args, bin_dir, save / "checkpoint_last.pt", name, commands)
        (args.work / f"{name}.test.{args.tgt}").write_text("\n".join(hyps) + "\n", encoding="utf-8")
        bleu = sacrebleu.corpus_bleu(hyps, [references])
        row = {"bleu": round(bleu.score, 2), "sentences_per_s": speed, "sentences_per_s_runs": [speed],
               "updates": int(done[-1]) if done else 0, "train_minutes": round(minutes, 1),
               "valid_nll_loss": float(valid[-1][1]) if valid else None, "sacrebleu": str(bleu),
               "load_average_after": kit.load_average()}
        if "--convert-from" in extra:  # the options that make this row what it is
            row["t2r_options"] = shlex.join(str(a) for a in extra[extra.index(teacher_ckpt) + 1:])
        if name != "teacher":
            row["init"] = "teacher (update 0: the teacher's weights)"
        return row

    store.run_rows(list(filter(None, args.rows.split(","))), rows, set(filter(None, args.force.split(","))),
                   run_row, lambda: setup(args, commands))

    if args.speed_repeats:
        # One timing can be slowed by whatever ran beside it. Time every recorded model again,
        # interleaved, and report the best run of each: the least disturbed one (`--rows ''` times
        # without training anything).
        results = store.load()
        names = [n for n in rows if n in results and (args.work / n / "checkpoint_last.pt").exists()]
        load = kit.load_average()
        warning = kit.busy_warning("the sentences/s")
        if warning:
            print(warning, flush=True)
        for repeat in range(args.speed_repeats):
            for name in names:
                log(f"{name}: timing generation ({repeat + 1}/{args.speed_repeats})")
                _, speed = generate(args, bin_dir, args.work / name / "checkpoint_last.pt", f"{name}.speed{repeat}",
                                    commands)
                row = store.load()[name]
                row["sentences_per_s_runs"] = row.get("sentences_per_s_runs", [row["sentences_per_s"]]) + [speed]
                row["sentences_per_s"] = max(row["sentences_per_s_runs"])
                row["timing_load"] = load  # 1-minute load average when this timing pass started
                store.record(name, row)
                store.record("setup", setup(args, commands))
    log(f"results in {args.results}")


def setup(args, commands):
    """How the rows were made, for the results file."""
    import sacrebleu

    return {
        "commands": list(dict.fromkeys(commands)),
        "model": f"transformer {args.layers} layers x {args.embed_dim} (ffn {args.ffn_dim}, {args.heads} heads), "
                 f"shared embeddings, joint sentencepiece BPE {args.vocab}, {args.src}->{args.tgt}; "
                 f"T2R feature size {args.feature_dim}",
        "eval": "fairseq-generate --beam 5 --remove-bpe sentencepiece on test_2016_flickr, sacreBLEU "
                f"{sacrebleu.__version__} (13a, detokenized); sentences/s as fairseq-generate reports it (batch "
                f"size {args.gen_batch_size}, CPU, {args.threads} torch thread(s)), best of the runs listed",
        "machine": kit.machine(),
        "date": datetime.date.today().isoformat(),
    }


if __name__ == "__main__":
    main()
