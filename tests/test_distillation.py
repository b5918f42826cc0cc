"""The attention-transfer criterion's distillation terms and attention-only finetuning, on a tiny
translation model converted from a softmax teacher: cross-attention transfer, the KL term, label
smoothing, --t2r-finetune attention (in-process through fairseq's own parser, task and criterion
builders, and once through fairseq-train as typed), and every bad value as one line."""
import re

import pytest
import torch

from helpers import (TINY_LM, TINY_MT, TINY_MT_SOFTMAX, TINY_WIKI103, TINY_WIKI103_SOFTMAX, USER_DIR, build_model, run,
                     save_checkpoint, write_parallel_corpus)


@pytest.fixture(scope="module")
def mt(tmp_path_factory):
    """A tiny binarized parallel corpus and a softmax transformer teacher for it (untrained: what is
    tested here is what moves, not how well)."""
    from fairseq.data import Dictionary

    root = write_parallel_corpus(tmp_path_factory.mktemp("distill"), {"train": 40})
    run(["fairseq-preprocess", "--source-lang", "src", "--target-lang", "tgt", "--trainpref", root / "train",
         "--destdir", root / "bin", "--joined-dictionary", "--workers", 1])
    vocab = len(Dictionary.load(str(root / "bin/dict.src.txt")))
    teacher, cfg = build_model("transformer", TINY_MT_SOFTMAX, vocab=vocab, task="translation")
    save_checkpoint(root / "teacher.pt", teacher, cfg, task="translation")
    return root


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A dictionary and a softmax transformer_lm_wiki103 teacher (adaptive input and softmax) for it."""
    from fairseq.data import Dictionary

    root = tmp_path_factory.mktemp("distill_lm")
    (root / "dict.txt").write_text("".join(f"word{i} 1\n" for i in range(60)))
    vocab = len(Dictionary.load(str(root / "dict.txt")))
    teacher, cfg = build_model("transformer_lm_wiki103", TINY_WIKI103_SOFTMAX, vocab=vocab)
    save_checkpoint(root / "teacher.pt", teacher, cfg)
    return root


def _build(*flags):
    """(task, model, criterion) as fairseq-train builds them from its command line."""
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    args = options.parse_args_and_arch(options.get_training_parser(), [*map(str, flags), "--user-dir", USER_DIR,
                                                                       "--cpu"])
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    torch.manual_seed(0)
    model = task.build_model(cfg.model)
    return task, model, task.build_criterion(cfg.criterion)


def _model_cfg(mt, *extra):
    """The model config fairseq-train would build the translation student from (no --convert-from)."""
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    args = options.parse_args_and_arch(options.get_training_parser(), [
        *map(str, [mt / "bin", "--task", "t2r_translation", "--arch", "t2r_transformer", *TINY_MT, *extra]),
        "--user-dir", USER_DIR, "--cpu"])
    return convert_namespace_to_omegaconf(args).model


def _setup(mt, *extra):
    """(task, model, criterion, a padded batch of 8 pairs) of the translation student."""
    task, model, criterion = _build(mt / "bin", "--task", "t2r_translation", "--arch", "t2r_transformer", *TINY_MT,
                                    "--convert-from", mt / "teacher.pt", "--criterion", "t2r_attention_transfer",
                                    *extra)
    task.load_dataset("train")
    data = task.dataset("train")
    return task, model, criterion, data.collater([data[i] for i in range(8)])


def _train(model, criterion, sample, updates):
    """What fairseq's trainer does per update: an optimizer over the parameters that require grad
    when it is built, the update count set before the criterion runs."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for update in range(updates):
        model.set_num_updates(update)
        loss, _, _ = criterion(model, sample)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _moved(before, model):
    return {name for name, value in model.state_dict().items() if not torch.equal(value, before[name])}


def test_transfer_only_updates_train_self_and_cross_attention_feature_maps(mt):
    _, model, criterion, sample = _setup(mt, "--attention-transfer-only-updates", 3)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    _train(model, criterion, sample, 3)
    maps = {f"decoder.layers.{i}.{role}.feature_map.{p}" for i in range(2) for role in ("self_attn", "encoder_attn")
            for p in ("weight", "bias")}
    assert _moved(before, model) == maps


@pytest.mark.parametrize("flags", [
    ("--t2r-softmax-layers", "0,1"),  # self-attention kept softmax: cross-attention is all there is to transfer
    ("--attention-transfer-modules", "cross"),  # the transfer term reads cross-attention alone
])
def test_cross_attention_alone_is_transferred(mt, flags):
    """In the transfer-only updates only cross-attention's feature maps move: self-attention's get
    no gradient (or are softmax)."""
    _, model, criterion, sample = _setup(mt, *flags, "--attention-transfer-only-updates", 2)
    model.train()
    _, _, log = criterion(model, sample)
    assert log["transfer_loss"] > 0
    before = {name: value.clone() for name, value in model.state_dict().items()}
    _train(model, criterion, sample, 2)
    assert _moved(before, model) == {f"decoder.layers.{i}.encoder_attn.feature_map.{p}" for i in range(2)
                                     for p in ("weight", "bias")}


def test_cross_attention_only_transfer_on_a_language_model_is_one_line(lm):
    with pytest.raises(ValueError, match="--attention-transfer-modules cross transfers cross-attention"):
        _build(lm, "--task", "t2r_language_modeling", "--arch", "t2r_lm_wiki103", *TINY_WIKI103, "--convert-from",
               lm / "teacher.pt", "--criterion", "t2r_attention_transfer", "--attention-transfer-modules", "cross")


def test_softmax_cross_attention_is_not_transferred(mt):
    """--t2r-cross-attention softmax and every self-attention softmax: the student is the teacher,
    nothing is transferred, and the KL term is zero; a T2R student's is positive."""
    from fairseq import models as fairseq_models

    from t2r_fairseq.checkpoints import load_checkpoint
    from t2r_fairseq.transfer import transfer_softmax_weights

    # --convert-from refuses a model with nothing to convert: the twin is built and loaded by hand.
    every_attention_softmax = ("--t2r-softmax-layers", "0,1", "--t2r-cross-attention", "softmax")
    with pytest.raises(ValueError, match="every attention stays softmax"):
        _setup(mt, *every_attention_softmax)
    task, student, criterion, sample = _setup(mt, "--distill-kl-weight", 1)
    twin = fairseq_models.build_model(_model_cfg(mt, *every_attention_softmax), task)
    transfer_softmax_weights(twin, load_checkpoint(str(mt / "teacher.pt"))["model"])
    twin.train()
    _, _, log = criterion(twin, sample)
    assert log["transfer_loss"] == 0 and abs(log["kl_loss"]) < 1e-4 * log["nll_loss"], log
    student.train()
    _, _, log = criterion(student, sample)
    assert log["kl_loss"] > 1e-2 * log["nll_loss"] and log["transfer_loss"] > 0, log


def test_kl_ignores_padding(mt):
    """The KL of a padded batch is the sum of its sentences' KL, each alone (no padding)."""
    task, model, criterion, batch = _setup(mt, "--distill-kl-weight", 1, "--attention-transfer-weight", 0)
    pad = task.target_dictionary.pad()
    assert batch["target"].eq(pad).any()
    model.train()
    data = task.dataset("train")
    alone = [criterion(model, data.collater([data[i]]))[2]["kl_loss"] for i in batch["id"].tolist()]
    assert all(kl > 0 for kl in alone)
    torch.testing.assert_close(criterion(model, batch)[2]["kl_loss"], sum(alone), rtol=1e-4, atol=0)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_loss_is_fairseqs_label_smoothed_cross_entropy_plus_the_weighted_terms(mt, eps):
    """Validation scores fairseq's (label-smoothed) cross-entropy; training adds the weighted terms.
    Label smoothing 0 is the criterion as it was: cross-entropy + transfer."""
    from fairseq.criterions.cross_entropy import CrossEntropyCriterion
    from fairseq.criterions.label_smoothed_cross_entropy import LabelSmoothedCrossEntropyCriterion

    task, model, criterion, sample = _setup(mt, "--label-smoothing", eps, "--distill-kl-weight", 0.5)
    reference = LabelSmoothedCrossEntropyCriterion(task, False, eps) if eps else CrossEntropyCriterion(task, False)
    for training in (False, True):
        model.train(training)
        loss, sample_size, log = criterion(model, sample)
        expected, expected_size, expected_log = reference(model, sample)
        assert sample_size == expected_size
        torch.testing.assert_close(log["nll_loss"], expected_log["nll_loss"] if eps else expected)
        terms = log["transfer_loss"] + log["kl_loss"]
        assert (terms > 0) == training
        torch.testing.assert_close(loss, expected + terms)


@pytest.mark.parametrize("kind", ["lm", "mt"])
def test_finetune_attention_trains_exactly_the_t2r_attention(mt, lm, kind):
    """--t2r-finetune attention, with a hybrid (layer 1 keeps softmax self-attention): only the T2R
    self- and cross-attention modules' tensors require grad."""
    task = {"lm": [lm, "--task", "t2r_language_modeling", "--arch", "t2r_lm", *TINY_LM],
            "mt": [mt / "bin", "--task", "t2r_translation", "--arch", "t2r_transformer", *TINY_MT]}[kind]
    _, model, _ = _build(*task, "--t2r-finetune", "attention", "--t2r-softmax-layers", 1)
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    t2r_attention = ("decoder.layers.0.self_attn.",) + (
        ("decoder.layers.0.encoder_attn.", "decoder.layers.1.encoder_attn.") if kind == "mt" else ())
    assert trained == {name for name, _ in model.named_parameters() if name.startswith(t2r_attention)}
    assert "decoder.layers.0.self_attn.q_proj.weight" in trained


def test_transfer_only_updates_never_unfreeze_what_finetune_froze(mt):
    """The criterion narrows what trains to the new tensors for the transfer-only updates, then
    gives back exactly what --t2r-finetune left trainable."""
    _, model, criterion, sample = _setup(mt, "--t2r-finetune", "attention", "--t2r-softmax-layers", 1,
                                         "--attention-transfer-only-updates", 1)

    def trained():
        return {name for name, p in model.named_parameters() if p.requires_grad}

    attention = trained()
    model.train()
    for update, expected in ((0, {name for name in attention if ".feature_map." in name}), (1, attention)):
        model.set_num_updates(update)
        criterion(model, sample)
        assert trained() == expected and expected, update


def test_finetune_attention_with_distillation_as_typed(mt):
    """fairseq-train with the recommended translation flags and --t2r-finetune attention, a hybrid
    (layer 1 keeps softmax self-attention), transfer-only updates first: every tensor outside the T2R
    attention is still the teacher's bit for bit, and the T2R attention projections moved."""
    save = mt / "attention_only"
    proc = run(["fairseq-train", mt / "bin", "--user-dir", USER_DIR, "--task", "t2r_translation",
                "--convert-from", mt / "teacher.pt", "--arch", "t2r_transformer", *TINY_MT,
                "--t2r-softmax-layers", 1, "--t2r-finetune", "attention", "--criterion", "t2r_attention_transfer",
                "--label-smoothing", 0.1, "--distill-kl-weight", 0.5, "--attention-transfer-only-updates", 1,
                "--optimizer", "adam", "--lr", 1e-2, "--batch-size", 8, "--max-update", 3, "--save-dir", save,
                "--disable-validation", "--no-epoch-checkpoints", "--cpu",
                "--num-workers", 0, "--log-format", "simple", "--log-interval", 1, "--seed", 1])
    log = proc.stdout + proc.stderr
    kl = [float(x) for x in re.findall(r"train_inner \|.*? kl_loss=([0-9.]+)", log)]
    assert len(kl) == 3 and all(x > 0 for x in kl), log[-3000:]
    student = torch.load(save / "checkpoint_last.pt")["model"]
    teacher = torch.load(mt / "teacher.pt")["model"]
    t2r_attention = ("decoder.layers.0.self_attn.", "decoder.layers.0.encoder_attn.", "decoder.layers.1.encoder_attn.")
    for name, value in teacher.items():
        if not name.startswith(t2r_attention):
            assert torch.equal(student[name], value), name
    assert all(not torch.equal(student[f"{prefix}q_proj.weight"], teacher[f"{prefix}q_proj.weight"])
               for prefix in t2r_attention)


# -- bad values: one line naming the fix ----------------------------------------------------------
@pytest.fixture(scope="module")
def dictionaries(tmp_path_factory):
    """All fairseq-train reads before it builds the model and the criterion: the dictionaries."""
    root = tmp_path_factory.mktemp("dicts")
    for name in ("dict.src.txt", "dict.tgt.txt"):
        (root / name).write_text("".join(f"word{i} 1\n" for i in range(20)))
    return root


MT = ["--task", "t2r_translation", "--arch", "t2r_transformer", "-s", "src", "-t", "tgt", "--encoder-layers", 1,
      "--decoder-layers", 1, "--encoder-embed-dim", 16, "--decoder-embed-dim", 16, "--encoder-attention-heads", 2,
      "--decoder-attention-heads", 2, "--t2r-feature-dim", 4]
CRITERION = ["--criterion", "t2r_attention_transfer"]


@pytest.mark.parametrize("flags,expect", [
    (CRITERION, "t2r_attention_transfer needs the softmax teacher for --attention-transfer-weight 1: pass "
                "--convert-from"),
    (CRITERION + ["--attention-transfer-weight", 0, "--distill-kl-weight", 0.5],
     "needs the softmax teacher for --distill-kl-weight 0.5: pass --convert-from"),
    (CRITERION + ["--attention-transfer-weight", -1], "--attention-transfer-weight must be >= 0, got -1.0"),
    (CRITERION + ["--distill-kl-weight", -0.5], "--distill-kl-weight must be >= 0, got -0.5"),
    (CRITERION + ["--attention-transfer-only-updates", -2], "--attention-transfer-only-updates must be >= 0, got -2"),
    (CRITERION + ["--label-smoothing", -0.1], "--label-smoothing must be in [0, 1), got -0.1"),
    (CRITERION + ["--label-smoothing", 1], "--label-smoothing must be in [0, 1), got 1.0"),
    (CRITERION + ["--attention-transfer-only-updates", 5, "--attention-transfer-weight", 0],
     "--attention-transfer-weight 0 turns off: give it a positive weight"),
    (["--t2r-finetune", "attention", "--t2r-softmax-layers", 0, "--t2r-cross-attention", "softmax"],
     "--t2r-finetune attention trains only T2R attention, and this model keeps every attention softmax: drop "
     "--t2r-finetune attention, or make some attention T2R"),
])
def test_bad_values_are_one_line(dictionaries, tmp_path, flags, expect):
    proc = run(["fairseq-train", dictionaries, "--user-dir", USER_DIR, *MT, *flags, "--cpu", "--max-tokens", 64,
                "--save-dir", tmp_path / "checkpoints"], check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("fairseq-train: error: ") and expect in last, proc.stderr[-3000:]


def test_finetune_flag_is_refused_by_tasks_that_would_ignore_it(dictionaries, tmp_path):
    """A task without --convert-from would not freeze anything: fairseq's parser refuses the flag."""
    proc = run(["fairseq-train", dictionaries, "--user-dir", USER_DIR, *MT, "--task", "translation",
                "--t2r-finetune", "attention", "--cpu", "--save-dir", tmp_path / "checkpoints"], check=False)
    assert proc.returncode == 2 and "unrecognized arguments: --t2r-finetune attention" in proc.stderr


@pytest.mark.parametrize("flag", ["--label-smoothing", "--distill-kl-weight"])
def test_adaptive_softmax_refuses_what_needs_every_word(lm, flag):
    """fairseq's adaptive softmax gives every word's probability only without autograd."""
    from t2r_fairseq.errors import T2RUsageError

    _, model, criterion = _build(lm, "--task", "t2r_language_modeling", "--arch", "t2r_lm_wiki103", *TINY_WIKI103,
                                 "--convert-from", lm / "teacher.pt", "--criterion", "t2r_attention_transfer",
                                 flag, 0.1)
    tokens = torch.randint(4, 60, (2, 8))
    sample = {"net_input": {"src_tokens": tokens, "src_lengths": torch.tensor([8, 8])}, "target": tokens,
              "ntokens": 16}
    with pytest.raises(T2RUsageError, match=f"^{flag} needs every word's probability, which adaptive softmax"):
        criterion(model.train(), sample)
