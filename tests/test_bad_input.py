"""Bad input: one clear line naming the problem, a non-zero exit, no traceback, nothing written."""
import sys

import pytest
import torch

from helpers import TINY_LM, TINY_LM_SOFTMAX, TINY_WIKI103_SOFTMAX, build_model, parse_namespace, run, save_checkpoint


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


@pytest.mark.parametrize("flag,value,expect", [
    ("--t2r-feature-dim", 0, "must be positive"),
    ("--t2r-feature-map", "cosine", "invalid choice"),
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
    from t2r_fairseq.convert import transfer_softmax_weights

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


def test_bad_t2r_options_fail_model_build():
    with pytest.raises(ValueError, match="--t2r-feature-dim must be positive"):
        build_model("t2r_lm", TINY_LM + ["--t2r-feature-dim", 0])
    with pytest.raises(ValueError, match="out of range"):
        build_model("t2r_lm", TINY_LM + ["--t2r-softmax-layers", 5])


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
