"""Bad input: one clear line naming the problem, a non-zero exit, no traceback, nothing written."""
import errno
import os
import re
import shutil
import stat
import subprocess
import sys

import pytest
import torch

from helpers import (BIN, TINY_LM, TINY_LM_SOFTMAX, TINY_MT, TINY_MT_SOFTMAX, TINY_WIKI103_SOFTMAX, USER_DIR,
                     build_model, parse_namespace, run, save_checkpoint, write_parallel_corpus)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    softmax, cfg = build_model("transformer_lm", TINY_LM_SOFTMAX)
    t2r, t2r_cfg = build_model("t2r_lm", TINY_LM)
    ckpt = save_checkpoint(root / "softmax.pt", softmax, cfg)
    data = ckpt.read_bytes()
    (root / "truncated.pt").write_bytes(data[: len(data) // 2])
    (root / "notes.txt").write_text("not a checkpoint\n")
    roberta_cfg = dict(torch.load(ckpt, weights_only=False)["cfg"]["model"], _name="roberta", arch="roberta_base")
    save_checkpoint(root / "roberta.pt", softmax, roberta_cfg)
    save_checkpoint(root / "t2r.pt", t2r, t2r_cfg)
    return root


def _convert_fails(args, expect, tmp_path, capsys):
    """The converter's entry point in-process (a subprocess per case would mostly time imports)."""
    from t2r_fairseq.convert import main

    out = tmp_path / "out.pt"
    try:
        code = main([*map(str, args), "--output", str(out)])
    except SystemExit as e:  # argparse errors
        code = e.code
    err = capsys.readouterr().err
    assert code != 0
    assert expect in err.strip().splitlines()[-1], err  # the last line says it (argparse adds usage above)
    assert "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".t2r-convert-*")), "nothing half-written"
    return err


@pytest.mark.parametrize("name,expect", [
    ("truncated.pt", "not a readable fairseq checkpoint"),
    ("notes.txt", "not a readable fairseq checkpoint"),
    ("missing.pt", "no such checkpoint file"),
    ("roberta.pt", "cannot convert architecture 'roberta_base'"),
    ("t2r.pt", "already a T2R model"),
])
def test_converter_rejects_bad_checkpoints(checkpoints, tmp_path, capsys, name, expect):
    err = _convert_fails(["--input", checkpoints / name], expect, tmp_path, capsys)
    assert name in err  # names the file
    assert "weights_only" not in err  # torch's advice to load unsafely: wrong for a file that is no checkpoint


def test_convert_refuses_to_tie_what_the_teacher_kept_apart():
    """A teacher with separate encoder and decoder embeddings into a --share-all-embeddings student
    would keep only one of them, silently: refused, naming the flags."""
    from t2r_fairseq.checkpoints import CheckpointError
    from t2r_fairseq.transfer import transfer_softmax_weights

    teacher, _ = build_model("transformer", TINY_MT_SOFTMAX, task="translation")
    student, _ = build_model("t2r_transformer", TINY_MT + ["--share-all-embeddings"], task="translation")
    with pytest.raises(CheckpointError, match="encoder.embed_tokens.weight and decoder.embed_tokens.weight.*"
                                              "--share-all-embeddings"):
        transfer_softmax_weights(student, teacher.state_dict())
    shared, _ = build_model("transformer", TINY_MT_SOFTMAX + ["--share-all-embeddings"], task="translation")
    transfer_softmax_weights(student, shared.state_dict())  # the teacher's own sharing converts


@pytest.mark.parametrize("flag,value,expect", [
    ("--t2r-feature-dim", 0, "--t2r-feature-dim must be a positive integer, got 0"),
    ("--t2r-chunk-size", -1, "--t2r-chunk-size must be a positive integer, got -1"),
    ("--t2r-softmax-layers", "1,x", "--t2r-softmax-layers must be comma-separated layer indices"),
    ("--t2r-softmax-layers", 2, "--t2r-softmax-layers [2] out of range for 2 decoder layers"),
    ("--t2r-feature-map", "cosine", "invalid choice"),
    ("--t2r-softmax-layers", "0,1", "--t2r-softmax-layers covers all 2 decoder layers: every attention stays softmax"),
    ("--t2r-cross-feature-dim", 8, "--t2r-cross-feature-dim sets the features of T2R cross-attention, which a "
                                   "language model does not have"),
])
def test_converter_rejects_bad_options(checkpoints, tmp_path, capsys, flag, value, expect):
    _convert_fails(["--input", checkpoints / "softmax.pt", flag, value], expect, tmp_path, capsys)


def test_console_script_error_is_one_line(checkpoints, tmp_path):
    proc = run(["t2r-convert", "--input", checkpoints / "truncated.pt", "--output", tmp_path / "x.pt"], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("t2r-convert: error:")


def test_convert_from_rejects_t2r_checkpoint_and_mismatched_shapes(checkpoints):
    import t2r_fairseq  # noqa: F401
    from t2r_fairseq.checkpoints import CheckpointError, load_checkpoint
    from t2r_fairseq.transfer import transfer_softmax_weights

    student, _ = build_model("t2r_lm", TINY_LM)
    with pytest.raises(CheckpointError, match="already a T2R checkpoint"):
        transfer_softmax_weights(student, load_checkpoint(str(checkpoints / "t2r.pt"))["model"])
    wider, _ = build_model("t2r_lm", TINY_LM + ["--decoder-embed-dim", 48])
    with pytest.raises(CheckpointError, match=r"shapes do not match.*\(32,\) vs model \(48,\)"):
        transfer_softmax_weights(wider, load_checkpoint(str(checkpoints / "softmax.pt"))["model"])
    deeper, _ = build_model("t2r_lm", TINY_LM + ["--decoder-layers", 3])
    with pytest.raises(CheckpointError, match="lacks tensors.*layers.2"):
        transfer_softmax_weights(deeper, load_checkpoint(str(checkpoints / "softmax.pt"))["model"])
    shallower, _ = build_model("t2r_lm", TINY_LM + ["--decoder-layers", 1])
    with pytest.raises(CheckpointError, match="lacks.*more layers.*layers.1"):
        transfer_softmax_weights(shallower, load_checkpoint(str(checkpoints / "softmax.pt"))["model"])


@pytest.mark.parametrize("flag,value,expect", [
    ("--t2r-feature-dim", 0, "--t2r-feature-dim must be a positive integer, got 0"),
    ("--t2r-chunk-size", 0, "--t2r-chunk-size must be a positive integer, got 0"),
    ("--t2r-chunk-size", -1, "--t2r-chunk-size must be a positive integer, got -1"),
    ("--t2r-softmax-layers", 5, r"--t2r-softmax-layers \[5\] out of range for 2 decoder layers"),
])
def test_bad_t2r_options_fail_model_build(flag, value, expect):
    from t2r_fairseq.options import T2ROptionError

    with pytest.raises(T2ROptionError, match=expect):
        build_model("t2r_lm", TINY_LM + [flag, value])


def test_old_style_checkpoint_with_args_namespace_and_packed_in_proj(tmp_path):
    """Checkpoints like the public Baevski & Auli WikiText-103 model: 'args' is an argparse
    Namespace (refused by torch's safe loading unless allowed) and q/k/v are one in_proj matrix."""
    softmax, _ = build_model("transformer_lm_wiki103", TINY_WIKI103_SOFTMAX)
    state = softmax.state_dict()
    for i in range(2):
        p = f"decoder.layers.{i}.self_attn."
        for kind in ("weight", "bias"):
            state[p + f"in_proj_{kind}"] = torch.cat([state.pop(p + f"{n}_proj.{kind}") for n in "qkv"])
    args = parse_namespace("transformer_lm_wiki103", TINY_WIKI103_SOFTMAX)
    path = tmp_path / "old.pt"
    torch.save({"args": args, "model": state, "optimizer_history": [{"criterion_name": "AdaptiveLoss",
                "optimizer_name": "NAG", "lr_scheduler_state": {}, "num_updates": 0}],
                "extra_state": {"train_iterator": {"epoch": 1}}}, path)
    # What fairseq's CLIs hit under torch >= 2.6 without the plugin: safe loading refuses it.
    plain = run([sys.executable, "-c", f"import torch; torch.load({str(path)!r})"], check=False)
    assert plain.returncode != 0 and "Namespace" in plain.stderr
    run(["t2r-convert", "--input", path, "--output", tmp_path / "t2r.pt"])
    converted = torch.load(tmp_path / "t2r.pt")["model"]  # plugin registered Namespace as safe
    torch.testing.assert_close(converted["decoder.layers.1.self_attn.k_proj.weight"],
                               softmax.state_dict()["decoder.layers.1.self_attn.k_proj.weight"])


# -- t2r-convert's --output, as typed ----------------------------------------------------------------
def _assert_one_line_error(proc, expect, prog="t2r-convert", code=2):
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{prog}: error: ") and expect in last, proc.stderr[-3000:]


@pytest.mark.parametrize("spelling", ["same", "dot-dot", "relative", "symlink"])
def test_converter_refuses_to_overwrite_its_input(checkpoints, tmp_path, spelling):
    teacher = tmp_path / "softmax.pt"
    shutil.copy(checkpoints / "softmax.pt", teacher)
    before = teacher.read_bytes()
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.pt").symlink_to(teacher)
    output = {"same": teacher, "dot-dot": tmp_path / "sub/../softmax.pt", "relative": "softmax.pt",
              "symlink": tmp_path / "link.pt"}[spelling]
    proc = run(["t2r-convert", "--input", teacher, "--output", output], cwd=tmp_path, check=False)
    _assert_one_line_error(proc, "is the input checkpoint")
    assert teacher.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.pt", "softmax.pt", "sub"]  # no temporary file


def test_converter_output_that_is_a_directory(checkpoints, tmp_path):
    proc = run(["t2r-convert", "--input", checkpoints / "softmax.pt", "--output", tmp_path], check=False)
    _assert_one_line_error(proc, f"--output {tmp_path} is a directory; give a file name")
    assert list(tmp_path.iterdir()) == []


def test_converter_output_under_a_regular_file(checkpoints, tmp_path):
    """The OS refuses to create the file, as in a read-only directory (which does not stop root,
    who runs these tests): one line, nothing written."""
    (tmp_path / "notes.txt").write_text("notes\n")
    proc = run(["t2r-convert", "--input", checkpoints / "softmax.pt", "--output", tmp_path / "notes.txt/t2r.pt"],
               check=False)
    _assert_one_line_error(proc, "cannot write --output")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"] and (tmp_path / "notes.txt").read_text() == "notes\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_converter_read_only_output_directory(checkpoints, tmp_path):
    out_dir = tmp_path / "read_only"
    out_dir.mkdir()
    out_dir.chmod(0o555)
    proc = run(["t2r-convert", "--input", checkpoints / "softmax.pt", "--output", out_dir / "t2r.pt"], check=False)
    _assert_one_line_error(proc, "Permission denied")
    assert list(out_dir.iterdir()) == []


def test_converter_read_only_output_directory_as_root_sees_it(checkpoints, tmp_path, capsys, monkeypatch):
    """What a read-only directory does to a non-root user, made visible to root: creating the file
    fails with EACCES."""
    real_open = os.open

    def refuse_in_tmp_path(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse_in_tmp_path)
    _convert_fails(["--input", checkpoints / "softmax.pt"], "cannot write --output", tmp_path, capsys)
    assert list(tmp_path.iterdir()) == []


def test_converted_checkpoint_mode_follows_umask(checkpoints, tmp_path):
    out = tmp_path / "t2r.pt"
    proc = subprocess.run([str(BIN / "t2r-convert"), "--input", str(checkpoints / "softmax.pt"), "--output", str(out)],
                          capture_output=True, text=True, umask=0o027)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 0666 less the umask, as fairseq's own checkpoints get; mkstemp would give 0600.
    assert stat.S_IMODE(out.stat().st_mode) == 0o640


def test_converter_chunk_size_as_typed(checkpoints, tmp_path):
    for value in (0, -1):
        proc = run(["t2r-convert", "--input", checkpoints / "softmax.pt", "--output", tmp_path / "t2r.pt",
                    "--t2r-chunk-size", value], check=False)
        _assert_one_line_error(proc, f"--t2r-chunk-size must be a positive integer, got {value}")
    assert list(tmp_path.iterdir()) == []


# -- fairseq's CLIs with the plugin: bad options and combinations, one line ----------------------------
@pytest.fixture(scope="module")
def dictionaries(tmp_path_factory):
    """All fairseq-train reads before it builds the model: the dictionaries (data comes later)."""
    root = tmp_path_factory.mktemp("dicts")
    words = "".join(f"word{i} 1\n" for i in range(20))
    for name in ("dict.txt", "dict.src.txt", "dict.tgt.txt"):
        (root / name).write_text(words)
    return root


LM_TASK = ["--task", "t2r_language_modeling", "--arch", "t2r_lm", *TINY_LM]
MT_TASK = ["--task", "t2r_translation", "--arch", "t2r_transformer", "-s", "src", "-t", "tgt",
           "--encoder-layers", 1, "--decoder-layers", 1, "--encoder-embed-dim", 16, "--decoder-embed-dim", 16,
           "--encoder-attention-heads", 2, "--decoder-attention-heads", 2, "--t2r-feature-dim", 4]


def _train(dictionaries, tmp_path, args):
    return run(["fairseq-train", dictionaries, "--user-dir", USER_DIR, *args, "--cpu", "--max-tokens", 64,
                "--save-dir", tmp_path / "checkpoints"], check=False)


@pytest.mark.parametrize("flag,value,expect", [
    ("--t2r-chunk-size", 0, "--t2r-chunk-size must be a positive integer, got 0"),
    ("--t2r-chunk-size", -1, "--t2r-chunk-size must be a positive integer, got -1"),
    ("--t2r-softmax-layers", 7, "--t2r-softmax-layers [7] out of range for 2 decoder layers"),
])
def test_fairseq_train_bad_t2r_option_is_one_line(dictionaries, tmp_path, flag, value, expect):
    proc = _train(dictionaries, tmp_path, [*LM_TASK, flag, value])
    _assert_one_line_error(proc, expect, prog="fairseq-train", code=1)


@pytest.mark.parametrize("flags,expect", [
    (["--t2r-cross-feature-dim", 0], "--t2r-cross-feature-dim must be a positive integer, got 0"),
    (["--t2r-cross-feature-dim", 8, "--t2r-cross-attention", "softmax"],
     "--t2r-cross-feature-dim sets the features of T2R cross-attention, and --t2r-cross-attention softmax keeps it "
     "softmax: drop one of them"),
    (["--t2r-cross-feature-map", "hedgehog", "--t2r-cross-attention", "softmax"], "--t2r-cross-feature-map sets"),
])
def test_fairseq_train_bad_cross_feature_option_is_one_line(dictionaries, tmp_path, flags, expect):
    proc = _train(dictionaries, tmp_path, [*MT_TASK, *flags])
    _assert_one_line_error(proc, expect, prog="fairseq-train", code=1)


@pytest.mark.parametrize("task,half", [("lm", "--fp16"), ("lm", "--bf16"), ("mt", "--fp16"), ("mt", "--bf16")])
def test_fairseq_train_half_precision_on_cpu_is_one_line(dictionaries, tmp_path, task, half):
    proc = _train(dictionaries, tmp_path, [*{"lm": LM_TASK, "mt": MT_TASK}[task], half])
    _assert_one_line_error(proc, f"{half} needs a CUDA GPU; on CPU (--cpu) drop {half}", prog="fairseq-train", code=1)


@pytest.fixture(scope="module")
def tiny_translation(tmp_path_factory):
    """A tiny binarized parallel corpus, and untrained t2r_transformer checkpoints for it: T2R and
    softmax cross-attention."""
    root = write_parallel_corpus(tmp_path_factory.mktemp("tiny_mt"), {"train": 30, "test": 4})
    run(["fairseq-preprocess", "--source-lang", "src", "--target-lang", "tgt", "--trainpref", root / "train",
         "--testpref", root / "test", "--destdir", root / "bin", "--joined-dictionary", "--workers", 1])
    from fairseq.data import Dictionary

    vocab = len(Dictionary.load(str(root / "bin/dict.src.txt")))
    model_args = MT_TASK[MT_TASK.index("--encoder-layers"):]
    for name, extra in (("t2r", []), ("softmax_cross", ["--t2r-cross-attention", "softmax"])):
        model, cfg = build_model("t2r_transformer", model_args + extra, vocab=vocab, task="translation")
        save_checkpoint(root / f"{name}.pt", model, cfg, task="translation")
    return root


def _generate(root, checkpoint):
    return run(["fairseq-generate", root / "bin", "--user-dir", USER_DIR, "--path", root / checkpoint,
                "--gen-subset", "test", "--beam", 2, "--max-len-b", 4, "--batch-size", 4, "--cpu",
                # fairseq drops a last batch smaller than this multiple (8 by default)
                "--required-batch-size-multiple", 1, "--print-alignment"], check=False)


def test_print_alignment_with_t2r_cross_attention_names_the_fix(tiny_translation):
    _assert_one_line_error(_generate(tiny_translation, "t2r.pt"), "--t2r-cross-attention softmax",
                           prog="fairseq-generate", code=1)


def test_print_alignment_with_softmax_cross_attention_prints_alignments(tiny_translation):
    """The fix the error names works: softmax cross-attention has weights to align with."""
    proc = _generate(tiny_translation, "softmax_cross.pt")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^A-\d+\t\d+-\d+", proc.stdout, flags=re.M), proc.stdout[-3000:]
