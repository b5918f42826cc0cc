"""Shared test helpers: tiny models, a tiny corpus, and running the CLIs as a user would."""
import json
import os
import pathlib
import random
import re
import subprocess
import sys
from types import SimpleNamespace

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
USER_DIR = str(ROOT / "t2r_fairseq")
BIN = pathlib.Path(sys.executable).parent
SHARED_DATA = ROOT.parent / "shared" / "data"


def parse_namespace(arch, extra=(), task="language_modeling"):
    """The full argparse Namespace fairseq-train builds (what old fairseq stored as 'args')."""
    from fairseq import options

    parser = options.get_training_parser()
    return options.parse_args_and_arch(
        parser, ["unused-data-dir", "--task", task, "--arch", arch, "--user-dir", USER_DIR, *map(str, extra)])


def parse_model_args(arch, extra=(), task="language_modeling"):
    """fairseq's own parser and config conversion, so the model config is exactly what
    fairseq-train would pass to build_model."""
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    return convert_namespace_to_omegaconf(parse_namespace(arch, extra, task)).model


def build_model(arch, extra=(), vocab=60, src_vocab=None, task="language_modeling", seed=0):
    from fairseq.models import ARCH_MODEL_REGISTRY

    from t2r_fairseq.transfer import placeholder_dictionary

    args = parse_model_args(arch, extra, task)
    tgt = placeholder_dictionary(vocab)
    src = placeholder_dictionary(src_vocab or vocab)
    torch.manual_seed(seed)
    model = ARCH_MODEL_REGISTRY[arch].build_model(args, SimpleNamespace(source_dictionary=src, target_dictionary=tgt))
    return model.eval(), args


# Softmax architectures take the *_SOFTMAX lists; T2R ones add a small feature size.
TINY_LM_SOFTMAX = ["--decoder-layers", 2, "--decoder-embed-dim", 32, "--decoder-ffn-embed-dim", 64,
                   "--decoder-attention-heads", 4, "--dropout", 0]
TINY_WIKI103_SOFTMAX = TINY_LM_SOFTMAX + ["--decoder-input-dim", 32, "--decoder-output-dim", 32,
                                          "--adaptive-input-cutoff", "20,40", "--adaptive-softmax-cutoff", "20,40",
                                          "--adaptive-softmax-dropout", 0]
TINY_MT_SOFTMAX = ["--encoder-layers", 2, "--decoder-layers", 2, "--encoder-embed-dim", 32,
                   "--decoder-embed-dim", 32, "--encoder-ffn-embed-dim", 64, "--decoder-ffn-embed-dim", 64,
                   "--encoder-attention-heads", 4, "--decoder-attention-heads", 4, "--dropout", 0]
TINY_LM = TINY_LM_SOFTMAX + ["--t2r-feature-dim", 8]
TINY_WIKI103 = TINY_WIKI103_SOFTMAX + ["--t2r-feature-dim", 8]
TINY_MT = TINY_MT_SOFTMAX + ["--t2r-feature-dim", 8]


# The CLI tests' model: transformer_lm_wiki103-shaped (adaptive input and softmax), tiny.
MODEL = ["--decoder-layers", 2, "--decoder-embed-dim", 32, "--decoder-input-dim", 32, "--decoder-output-dim", 32,
         "--decoder-ffn-embed-dim", 64, "--decoder-attention-heads", 4, "--adaptive-input-cutoff", "100,300",
         "--adaptive-softmax-cutoff", "100,300", "--adaptive-softmax-dropout", 0, "--dropout", 0.1]
TRAIN = ["--tokens-per-sample", 64, "--max-tokens", 512, "--optimizer", "adam", "--lr", 1e-3,
         "--criterion", "adaptive_loss", "--ddp-backend", "legacy_ddp", "--no-epoch-checkpoints", "--cpu",
         "--num-workers", 0, "--log-format", "simple", "--log-interval", 5, "--seed", 3]


def write_corpus(directory, n_train=1500, n_valid=150, n_test=150, seed=0):
    """Real English (Python's reference documentation, shipped with Python) as train/valid/test."""
    import pydoc_data.topics

    lines = [line.strip() for text in pydoc_data.topics.topics.values() for line in text.splitlines()
             if len(line.split()) > 3]
    random.Random(seed).shuffle(lines)
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    splits = {"train": lines[:n_train], "valid": lines[n_train:n_train + n_valid],
              "test": lines[n_train + n_valid:n_train + n_valid + n_test]}
    for name, split in splits.items():
        (directory / f"{name}.txt").write_text("\n".join(split) + "\n")
    return directory


def write_parallel_corpus(directory, splits, src="src", tgt="tgt", seed=0):
    """A parallel corpus, {split name: number of pairs} -> <name>.<src>/<name>.<tgt>: source, a short
    line of Python's reference documentation; target, its words reversed. Reversal is deterministic
    and needs cross-attention over the whole source."""
    import pydoc_data.topics

    lines = sorted({" ".join(line.split()).lower() for text in pydoc_data.topics.topics.values()
                    for line in text.splitlines() if 3 < len(line.split()) <= 10})
    random.Random(seed).shuffle(lines)
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    start = 0
    for split, n in splits.items():
        chunk = lines[start:start + n]
        start += n
        (directory / f"{split}.{src}").write_text("\n".join(chunk) + "\n")
        (directory / f"{split}.{tgt}").write_text("\n".join(" ".join(reversed(s.split())) for s in chunk) + "\n")
    return directory


def run(cmd, cwd=None, check=True, env=None, input=None):
    """Run a console command from this environment's bin/ (`input`: its stdin); return the completed process."""
    cmd = [str(c) for c in cmd]
    if not os.path.isabs(cmd[0]) and (BIN / cmd[0]).exists():
        cmd[0] = str(BIN / cmd[0])
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=full_env, input=input)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def rerun_keeps_recorded_rows(cmd, results, work):
    """A recipe's command (run from the repository root, as `python -m examples....`) run again resumes:
    its recorded rows stay as they were (the "setup" row aside, which says how it last ran) and no
    checkpoint under `work` is written again."""
    def state():
        rows = {name: row for name, row in json.loads(pathlib.Path(results).read_text()).items() if name != "setup"}
        return rows, {str(p): p.stat().st_mtime_ns for p in pathlib.Path(work).glob("**/checkpoint*.pt")}

    before = state()
    assert before[0] and before[1], before
    run(cmd, cwd=ROOT)
    assert state() == before


def conversion_log(log):
    """(tensors reused, names of the new tensors) from the line fairseq-train logs when
    --convert-from converts a softmax checkpoint; None when nothing was converted."""
    found = re.findall(r"converted .*: reused (\d+) tensors, (\d+) new: (.*)$", log, flags=re.M)
    if not found:
        return None
    assert len(found) == 1, found
    reused, count, names = found[0]
    return int(reused), _counted_names(count, names)


def converter_log(output):
    """Names of the new tensors t2r-convert logged, checked against the count it logged beside them."""
    found = re.findall(r"wrote .*: (\d+) new tensors \((.*)\)$", output, flags=re.M)
    assert len(found) == 1, output[-3000:]
    return _counted_names(*found[0])


def _counted_names(count, names):
    """The names of a logged "N new: a, b, ..." list, checked to be N."""
    names = set(names.split(", "))
    assert len(names) == int(count), names
    return names


def save_checkpoint(path, model, model_cfg, task="language_modeling"):
    """A checkpoint in fairseq's format (as fairseq's trainer writes it), without training."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(model_cfg, resolve=True, enum_to_str=True) if OmegaConf.is_config(model_cfg) \
        else model_cfg
    torch.save({"cfg": {"model": cfg, "task": {"_name": task}}, "model": model.state_dict(),
                "optimizer_history": [{"criterion_name": "CrossEntropyCriterion", "optimizer_name": "Adam",
                                       "lr_scheduler_state": {}, "num_updates": 0}],
                "extra_state": {"train_iterator": {"epoch": 1}}}, path)
    return path
