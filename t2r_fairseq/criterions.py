"""`t2r_attention_transfer`: cross-entropy plus a term that teaches each converted layer to
reproduce the frozen softmax teacher's attention output (attention transfer, as in Hedgehog and
LoLCATs). The teacher is the task's `--convert-from` checkpoint.

Each T2R layer is fed the teacher's own input to that layer, so every layer learns to imitate
softmax attention independently of how well the layers below it already do. With
`--attention-transfer-only-updates N`, the first N updates train only the new tensors (feature
maps, the gates of --t2r-decay, the balances of --t2r-window) on the transfer term (the rest of the
model stays exactly the teacher's); cross-entropy finetuning of everything follows.
"""
import math
from dataclasses import dataclass, field

import torch
from fairseq import checkpoint_utils, metrics, utils
from fairseq.criterions import register_criterion
from fairseq.criterions.adaptive_loss import AdaptiveLoss
from fairseq.criterions.cross_entropy import CrossEntropyCriterion, CrossEntropyCriterionConfig

from .attention import T2RSelfAttention
from .errors import T2RUsageError
from .tasks import task_config
from .transfer import is_new_tensor


@dataclass
class AttentionTransferConfig(CrossEntropyCriterionConfig):
    attention_transfer_weight: float = field(
        default=1.0, metadata={"help": "weight of the attention-transfer (MSE) term added to cross-entropy"})
    attention_transfer_only_updates: int = field(
        default=0, metadata={"help": "first N updates train only the new tensors (feature maps, decay gates, "
                                      "window balances), on the transfer term alone"})


def _unwrap(layer):
    return getattr(layer, "module", layer)  # checkpoint/FSDP wrappers


@register_criterion("t2r_attention_transfer", dataclass=AttentionTransferConfig)
class AttentionTransferCriterion(CrossEntropyCriterion):
    def __init__(self, task, sentence_avg, attention_transfer_weight=1.0, attention_transfer_only_updates=0):
        super().__init__(task, sentence_avg)
        teacher_path = getattr(task_config(task), "convert_from", None)
        if not teacher_path:
            raise T2RUsageError("--criterion t2r_attention_transfer needs the softmax teacher: pass --convert-from "
                                "with --task t2r_language_modeling or t2r_translation")
        self.weight = attention_transfer_weight
        self.only_updates = attention_transfer_only_updates
        (teacher,), _ = checkpoint_utils.load_model_ensemble([teacher_path], task=task)
        teacher.eval().requires_grad_(False)
        # A tuple keeps the teacher out of the criterion's parameters and state_dict: it is
        # neither optimized nor saved in every checkpoint.
        self._teacher = (teacher,)
        self._captured = {}
        for index, layer in enumerate(teacher.decoder.layers):
            _unwrap(layer).self_attn.register_forward_hook(self._capture(index), with_kwargs=True)

    def _capture(self, index):
        def hook(module, args, kwargs, output):
            query = kwargs.get("query", args[0] if args else None)
            self._captured[index] = (query, kwargs.get("key_padding_mask"), output[0])
        return hook

    def _transfer_loss(self, model, sample):
        """Squared error between each T2R layer's and the teacher's attention outputs, on the
        teacher's inputs, summed over non-padding positions and averaged over layers."""
        teacher, reference = self._teacher[0], next(model.parameters())
        if next(teacher.parameters()).device != reference.device or next(teacher.parameters()).dtype != reference.dtype:
            teacher.to(device=reference.device, dtype=reference.dtype)  # follows --fp16/--bf16 and the GPU
        self._captured.clear()
        with torch.no_grad():
            teacher(**sample["net_input"])
        total, layers = 0.0, 0
        for index, layer in enumerate(model.decoder.layers):
            attn = _unwrap(layer).self_attn
            if not isinstance(attn, T2RSelfAttention):
                continue  # hybrid: a layer kept softmax has nothing to learn here
            query, padding, target = self._captured[index]
            out, _ = attn(query=query, key=query, value=query, key_padding_mask=padding)
            # Relative to the teacher output's mean square: scale-free, so one weight suits any
            # model (a perfect copy scores 0, predicting zeros scores 1).
            target = target.float()
            err = (out.float() - target).pow(2).mean(-1) / target.pow(2).mean().clamp_min(1e-8)  # (time, batch)
            if padding is not None:
                err = err.masked_fill(padding.t(), 0.0)
            total, layers = total + err.sum(), layers + 1
        return total / max(layers, 1)

    def _task_loss(self, model, sample, reduce):
        """Summed token NLL: fairseq's adaptive loss for adaptive-softmax models, else cross-entropy."""
        if getattr(model.decoder, "adaptive_softmax", None) is not None:
            return AdaptiveLoss.forward(self, model, sample, reduce)[0].sum()
        return self.compute_loss(model, model(**sample["net_input"]), sample, reduce=reduce)[0]

    def forward(self, model, sample, reduce=True):
        # Training progress reaches a criterion only through the model: fairseq's task.train_step
        # calls model.set_num_updates just before the criterion (the trainer has no criterion
        # hook), and T2RDecoder keeps it, as fairseq's latency-augmented criterion reads it.
        updates = getattr(model.decoder, "num_updates", 0)
        transfer_only = model.training and updates < self.only_updates
        if model.training:
            for name, p in model.named_parameters():
                p.requires_grad_(not transfer_only or is_new_tensor(name))
        with torch.set_grad_enabled(torch.is_grad_enabled() and not transfer_only):
            nll = self._task_loss(model, sample, reduce)
        transfer = self._transfer_loss(model, sample) if model.training else nll.new_zeros(())
        weighted_transfer = self.weight * transfer
        loss = weighted_transfer if transfer_only else nll + weighted_transfer
        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        logging_output = {"loss": loss.data, "nll_loss": nll.data, "transfer_loss": weighted_transfer.data,
                          "ntokens": sample["ntokens"], "nsentences": sample["target"].size(0),
                          "sample_size": sample_size}
        return loss, sample_size, logging_output

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        def total(key):
            return sum(log.get(key, 0) for log in logging_outputs)

        sample_size, ntokens = total("sample_size"), total("ntokens")
        # One unit for all three (base 2, per token unless --sentence-avg), so that the logged
        # loss = nll_loss + transfer_loss (the weighted term), or transfer_loss alone in the
        # transfer-only updates, where nll_loss is only watched.
        metrics.log_scalar("loss", total("loss") / sample_size / math.log(2), sample_size, round=3)
        metrics.log_scalar("nll_loss", total("nll_loss") / ntokens / math.log(2), ntokens, round=3)
        metrics.log_scalar("transfer_loss", total("transfer_loss") / sample_size / math.log(2), sample_size, round=3)
        metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["nll_loss"].avg))  # rounded, as fairseq logs it

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
