"""`t2r_attention_transfer`: cross-entropy (label-smoothed with --label-smoothing, as fairseq's
label_smoothed_cross_entropy) plus two distillation terms from the frozen softmax teacher, the
task's `--convert-from` checkpoint:
- attention transfer (as in Hedgehog and LoLCATs): each T2R attention module (decoder
  self-attention, and the cross-attention of translation models) learns to reproduce the teacher's
  attention output. It is fed the teacher's own input to that module, so every layer learns to
  imitate softmax attention independently of how well the layers below it already do;
- `--distill-kl-weight`: KL(teacher || student) of the next-token distribution.
With `--attention-transfer-only-updates N`, the first N updates train only the new tensors (feature
maps, the gates of --t2r-decay, the balances of --t2r-window) on the transfer term (the rest of the
model stays exactly the teacher's); finetuning on every term follows.
"""
import math
from dataclasses import dataclass, field

import torch
from fairseq import checkpoint_utils, metrics, utils
from fairseq.criterions import register_criterion
from fairseq.criterions.adaptive_loss import AdaptiveLoss
from fairseq.criterions.cross_entropy import CrossEntropyCriterion, CrossEntropyCriterionConfig
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss
from fairseq.dataclass import ChoiceEnum
from fairseq.tasks.translation import TranslationTask

from .attention import T2RCrossAttention, T2RSelfAttention
from .errors import T2RUsageError
from .tasks import task_config
from .transfer import is_new_tensor

# The student's attention modules that learn from the teacher's, by the decoder layer's attribute.
TRANSFERRED = {"self_attn": T2RSelfAttention, "encoder_attn": T2RCrossAttention}
TRANSFER_MODULES = ("all", "cross")
# What a teacher's attention module is called with that its T2R counterpart is given in turn.
ATTENTION_INPUTS = ("query", "key", "value", "key_padding_mask")


@dataclass
class AttentionTransferConfig(CrossEntropyCriterionConfig):
    attention_transfer_weight: float = field(
        default=1.0, metadata={"help": "weight of the attention-transfer (relative squared error) term"})
    attention_transfer_modules: ChoiceEnum(TRANSFER_MODULES) = field(
        default="all", metadata={"help": "which T2R attention learns from the teacher's: all (decoder self- and "
                                         "cross-attention) or cross (translation: cross-attention alone)"})
    attention_transfer_only_updates: int = field(
        default=0, metadata={"help": "first N updates train only the new tensors (feature maps, decay gates, "
                                      "window balances), on the transfer term alone"})
    distill_kl_weight: float = field(
        default=0.0, metadata={"help": "weight of KL(teacher || student) of the next-token distribution; 0 = off"})
    label_smoothing: float = field(
        default=0.0, metadata={"help": "epsilon of label smoothing of the cross-entropy term, 0 = none"})


def _unwrap(layer):
    return getattr(layer, "module", layer)  # checkpoint/FSDP wrappers


def _check_values(weight, only_updates, kl_weight, eps):
    for flag, value in (("--attention-transfer-weight", weight), ("--distill-kl-weight", kl_weight),
                        ("--attention-transfer-only-updates", only_updates)):
        if value < 0:
            raise T2RUsageError(f"{flag} must be >= 0, got {value}")
    if not 0 <= eps < 1:
        raise T2RUsageError(f"--label-smoothing must be in [0, 1), got {eps}")
    if only_updates and not weight:
        raise T2RUsageError(f"--attention-transfer-only-updates {only_updates} trains on the transfer term alone, "
                            f"which --attention-transfer-weight 0 turns off: give it a positive weight")


@register_criterion("t2r_attention_transfer", dataclass=AttentionTransferConfig)
class AttentionTransferCriterion(CrossEntropyCriterion):
    def __init__(self, task, sentence_avg, attention_transfer_weight=1.0, attention_transfer_only_updates=0,
                 distill_kl_weight=0.0, label_smoothing=0.0, attention_transfer_modules="all"):
        super().__init__(task, sentence_avg)
        if str(attention_transfer_modules) == "cross" and not isinstance(task, TranslationTask):
            raise T2RUsageError("--attention-transfer-modules cross transfers cross-attention, which a language "
                                "model does not have: drop it")
        self.roles = ("encoder_attn",) if str(attention_transfer_modules) == "cross" else tuple(TRANSFERRED)
        _check_values(attention_transfer_weight, attention_transfer_only_updates, distill_kl_weight,
                      label_smoothing)
        self.weight = attention_transfer_weight
        self.only_updates = attention_transfer_only_updates
        self.kl_weight = distill_kl_weight
        self.eps = label_smoothing
        # The parameters the model leaves trainable (see --t2r-finetune), read at the first forward:
        # the transfer-only updates freeze more of them for a while, never unfreeze the others.
        self._trainable = None
        self._captured = {}
        # A tuple keeps the teacher out of the criterion's parameters and state_dict: it is
        # neither optimized nor saved in every checkpoint. Empty: no term needs it.
        self._teacher = ()
        if not (self.weight or self.kl_weight):
            return
        if getattr(task_config(task), "history_blocks", 0):
            raise T2RUsageError("--criterion t2r_attention_transfer compares the model with the softmax teacher on "
                                "each block alone, and --history-blocks gives the model the text before it too: drop "
                                "one of them")
        teacher_path = getattr(task_config(task), "convert_from", None)
        if not teacher_path:
            terms = " and ".join(f"{flag} {value:g}" for flag, value in (
                ("--attention-transfer-weight", self.weight), ("--distill-kl-weight", self.kl_weight)) if value)
            raise T2RUsageError(f"--criterion t2r_attention_transfer needs the softmax teacher for {terms}: pass "
                                f"--convert-from with --task t2r_language_modeling or t2r_translation, or set "
                                f"the weight to 0")
        (teacher,), _ = checkpoint_utils.load_model_ensemble([teacher_path], task=task)
        teacher.eval().requires_grad_(False)
        self._teacher = (teacher,)
        for index, layer in enumerate(teacher.decoder.layers):
            for role in TRANSFERRED:
                module = getattr(_unwrap(layer), role, None)
                if module is not None:  # a language model has no cross-attention
                    module.register_forward_hook(self._capture((role, index)), with_kwargs=True)

    def _capture(self, key):
        def hook(module, args, kwargs, output):
            call = {**dict(zip(ATTENTION_INPUTS, args)), **kwargs}
            self._captured[key] = ({name: call.get(name) for name in ATTENTION_INPUTS}, output[0])
        return hook

    def _run_teacher(self, model, sample):
        """The teacher's output on the sample, capturing each attention module's inputs and output."""
        teacher, reference = self._teacher[0], next(model.parameters())
        if next(teacher.parameters()).device != reference.device or next(teacher.parameters()).dtype != reference.dtype:
            teacher.to(device=reference.device, dtype=reference.dtype)  # follows --fp16/--bf16 and the GPU
        self._captured.clear()
        with torch.no_grad():
            return teacher(**sample["net_input"])

    def _transfer_loss(self, model):
        """Squared error between each T2R attention module's and the teacher's outputs, on the
        teacher's inputs, summed over non-padding target positions and averaged over modules."""
        total, modules = next(model.parameters()).new_zeros((), dtype=torch.float32), 0
        for index, layer in enumerate(model.decoder.layers):
            # The decoder's padding: the keys of self-attention, the queries of both roles.
            padding = self._captured[("self_attn", index)][0]["key_padding_mask"]
            for role in self.roles:
                attn = getattr(_unwrap(layer), role, None)
                kind = TRANSFERRED[role]
                if not isinstance(attn, kind):
                    continue  # a layer kept softmax (or no cross-attention) has nothing to learn here
                inputs, target = self._captured[(role, index)]
                out, _ = attn(**inputs)
                # Relative to the teacher output's mean square: scale-free, so one weight suits any
                # model (a perfect copy scores 0, predicting zeros scores 1).
                target = target.float()
                err = (out.float() - target).pow(2).mean(-1) / target.pow(2).mean().clamp_min(1e-8)  # (time, batch)
                if padding is not None:
                    err = err.masked_fill(padding.t(), 0.0)
                total, modules = total + err.sum(), modules + 1
        return total / max(modules, 1)

    def _task_loss(self, model, sample, reduce):
        """(summed loss, summed token NLL, the student's log-probabilities or None): fairseq's
        adaptive loss for adaptive-softmax models, else cross-entropy, label-smoothed by --label-smoothing."""
        if getattr(model.decoder, "adaptive_softmax", None) is not None:
            if self.eps or self.kl_weight:
                # fairseq's adaptive softmax gives every word's probability only without autograd.
                flags = [f for f, v in (("--label-smoothing", self.eps), ("--distill-kl-weight", self.kl_weight)) if v]
                raise T2RUsageError(f"{' and '.join(flags)} {'need' if len(flags) > 1 else 'needs'} every word's "
                                    f"probability, which adaptive softmax (--adaptive-softmax-cutoff) does not "
                                    f"compute in training: set {' and '.join(flags)} to 0, or use a model without "
                                    f"adaptive softmax")
            nll = AdaptiveLoss.forward(self, model, sample, reduce)[0].sum()
            return nll, nll, None
        net_output = model(**sample["net_input"])
        lprobs = model.get_normalized_probs(net_output, log_probs=True)
        lprobs = lprobs.view(-1, lprobs.size(-1))
        target = model.get_targets(sample, net_output).view(-1)
        loss, nll = label_smoothed_nll_loss(lprobs, target, self.eps, ignore_index=self.padding_idx, reduce=reduce)
        return loss, nll, lprobs

    def _kl_loss(self, lprobs, teacher_output, sample):
        """KL(teacher || student) of the next-token distribution, summed over non-padding targets."""
        teacher_lprobs = self._teacher[0].get_normalized_probs(teacher_output, log_probs=True)
        kl = torch.nn.functional.kl_div(lprobs, teacher_lprobs.view_as(lprobs).float(), log_target=True,
                                        reduction="none").sum(-1)
        return kl.masked_fill(sample["target"].view(-1).eq(self.padding_idx), 0.0).sum()

    def _set_trainable(self, model, transfer_only):
        if self._trainable is None:
            self._trainable = {p for p in model.parameters() if p.requires_grad}
        for name, p in model.named_parameters():
            p.requires_grad_(p in self._trainable and (not transfer_only or is_new_tensor(name)))

    def forward(self, model, sample, reduce=True):
        # Training progress reaches a criterion only through the model: fairseq's task.train_step
        # calls model.set_num_updates just before the criterion (the trainer has no criterion
        # hook), and T2RDecoder keeps it, as fairseq's latency-augmented criterion reads it.
        updates = getattr(model.decoder, "num_updates", 0)
        transfer_only = model.training and updates < self.only_updates
        if model.training:
            self._set_trainable(model, transfer_only)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not transfer_only):
            task_loss, nll, lprobs = self._task_loss(model, sample, reduce)
        transfer = kl = nll.new_zeros(())
        if model.training and self._teacher:  # distillation is training; validation scores the task loss
            teacher_output = self._run_teacher(model, sample)
            if self.weight:
                transfer = self.weight * self._transfer_loss(model)
            if self.kl_weight:
                kl = self.kl_weight * self._kl_loss(lprobs, teacher_output, sample)
        loss = transfer if transfer_only else task_loss + transfer + kl
        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        logging_output = {"loss": loss.data, "nll_loss": nll.data, "transfer_loss": transfer.data,
                          "kl_loss": kl.data, "ntokens": sample["ntokens"], "nsentences": sample["target"].size(0),
                          "sample_size": sample_size}
        return loss, sample_size, logging_output

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        def total(key):
            return sum(log.get(key, 0) for log in logging_outputs)

        sample_size, ntokens = total("sample_size"), total("ntokens")
        # One unit for all (base 2, per token unless --sentence-avg), so that the logged loss =
        # nll_loss (label-smoothed with --label-smoothing) + transfer_loss + kl_loss (the weighted
        # terms), or transfer_loss alone in the transfer-only updates, where the others are only watched.
        metrics.log_scalar("loss", total("loss") / sample_size / math.log(2), sample_size, round=3)
        metrics.log_scalar("nll_loss", total("nll_loss") / ntokens / math.log(2), ntokens, round=3)
        for term in ("transfer_loss", "kl_loss"):
            metrics.log_scalar(term, total(term) / sample_size / math.log(2), sample_size, round=3)
        # Rounded, as fairseq logs it.
        metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["nll_loss"].avg))

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
