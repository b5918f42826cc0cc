"""Conversion tasks: `t2r_language_modeling` and `t2r_translation`.

They are fairseq's language_modeling / translation plus `--convert-from PATH`: when training
starts fresh, the T2R model is initialized from that softmax checkpoint (see transfer.py). When
there is something to resume from, fairseq's normal resume wins and nothing is converted.
`--t2r-finetune attention` freezes all but the T2R attention, and `--history-blocks K` starts each
training block from the state of the text before it (history.py): training options, so a task's,
not the model's (the model's flags describe what a checkpoint is, and t2r-convert takes them all).
"""
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

from fairseq.dataclass import ChoiceEnum
from fairseq.tasks import register_task
from fairseq.tasks.language_modeling import LanguageModelingConfig, LanguageModelingTask
from fairseq.tasks.translation import TranslationConfig, TranslationTask
from omegaconf import II

from .checkpoints import load_checkpoint
from .errors import T2RUsageError
from .history import HistoryBlocks, check_options, token_stream
from .models import T2RLanguageModel, T2RTransformerModel, twin_architecture_name
from .transfer import attention_parameters, require_t2r_attention, transfer_softmax_weights

logger = logging.getLogger(__name__)

FINETUNE = ("all", "attention")  # what --t2r-finetune trains


@dataclass
class ConvertFromConfig:
    convert_from: Optional[str] = field(
        default=None, metadata={"help": "softmax transformer checkpoint to initialize the T2R model from "
                                        "when training starts fresh (ignored when resuming)"})
    t2r_finetune: ChoiceEnum(FINETUNE) = field(
        default="all", metadata={"help": "what training updates: all (the paper's) or attention: only the T2R "
                                         "attention (q/k/v/out projections, feature maps, decay gates, window "
                                         "balances); everything else keeps its initial values"})
    # Read, not set: conversion must not run when fairseq is about to resume.
    save_dir: str = II("checkpoint.save_dir")
    restore_file: str = II("checkpoint.restore_file")
    # Read, not set: half precision on CPU fails deep inside fairseq's trainer.
    cpu: bool = II("common.cpu")
    fp16: bool = II("common.fp16")
    bf16: bool = II("common.bf16")


def _resume_checkpoint(cfg) -> Optional[str]:
    """The checkpoint fairseq's load_checkpoint will resume from, if any (same rule as fairseq)."""
    restore = cfg.restore_file or "checkpoint_last.pt"
    path = os.path.join(cfg.save_dir, "checkpoint_last.pt") if restore == "checkpoint_last.pt" else restore
    return path if os.path.isfile(path) else None


def task_config(task):
    """language_modeling is a LegacyFairseqTask (its config is .args), translation a dataclass task (.cfg)."""
    return task.cfg if getattr(task, "cfg", None) is not None else task.args


def _check_precision(cfg):
    # `is True`: outside fairseq's CLIs (a config built by hand) the fields may hold the unresolved "${...}".
    for flag in ("fp16", "bf16"):
        if cfg.cpu is True and getattr(cfg, flag) is True:
            raise T2RUsageError(f"--{flag} needs a CUDA GPU; on CPU (--cpu) drop --{flag}")


class T2RTask:
    """What both tasks add to fairseq's: --convert-from on a fresh start, and early checks."""

    @classmethod
    def setup_task(cls, cfg, **kwargs):
        if not kwargs.get("from_checkpoint"):  # a checkpoint's saved flags were checked when it was trained
            _check_precision(cfg)
        return super().setup_task(cfg, **kwargs)

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        if from_checkpoint:  # loaded to be used (generation, scoring), not trained
            return model
        if task_config(self).convert_from:
            self._convert(model, cfg, task_config(self).convert_from)
        if str(getattr(task_config(self), "t2r_finetune", "all")) == "attention":
            _train_attention_only(model)
        return model

    def _convert(self, model, cfg, source):
        if not isinstance(model, (T2RLanguageModel, T2RTransformerModel)):
            # Otherwise the softmax model would load the softmax weights and train on as one, rc 0.
            arch = getattr(cfg, "arch", None) or getattr(cfg, "_name", None)
            raise T2RUsageError(f"--convert-from swaps softmax attention for T2R, and --arch {arch} builds a softmax "
                                f"model: use its T2R twin, --arch {twin_architecture_name(arch)}")
        require_t2r_attention(model)
        resume = _resume_checkpoint(task_config(self))
        if resume is not None:
            logger.info(f"resuming from {resume}: skipping --convert-from {source}")
            return
        new_keys = transfer_softmax_weights(model, load_checkpoint(source)["model"], source=source)
        logger.info(f"converted {source}: reused {len(model.state_dict()) - len(new_keys)} tensors, "
                    f"{len(new_keys)} new: {', '.join(new_keys)}")


def _train_attention_only(model):
    """--t2r-finetune attention: fairseq's trainer optimizes only parameters that require grad."""
    trainable = attention_parameters(model)
    if not trainable:
        raise T2RUsageError("--t2r-finetune attention trains only T2R attention, and this model keeps every "
                            "attention softmax: drop --t2r-finetune attention, or make some attention T2R "
                            "(fewer --t2r-softmax-layers, --t2r-cross-attention t2r)")
    model.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)


@dataclass
class T2RLanguageModelingConfig(LanguageModelingConfig, ConvertFromConfig):
    history_blocks: int = field(default=0, metadata={
        "help": "training only: each batch first reads into the recurrent state the k blocks of text before its "
                "blocks (k drawn per batch from 0..K, no gradients), as a carried state would hold them when "
                "scoring with --task t2r_truncated_bptt_lm; 0: every block starts from an empty state"})
    train_subset: str = II("dataset.train_subset")  # read, not set: the split whose blocks get their history


@register_task("t2r_language_modeling", dataclass=T2RLanguageModelingConfig)
class T2RLanguageModelingTask(T2RTask, LanguageModelingTask):
    def __init__(self, args, *rest, **kwargs):
        check_options(args.history_blocks, args.sample_break_mode, args.add_bos_token)
        super().__init__(args, *rest, **kwargs)

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        if self.args.history_blocks and (not isinstance(model, T2RLanguageModel)
                                         or model.decoder.options.softmax_layers):
            raise T2RUsageError("--history-blocks reaches a block only through every layer's recurrent state: it "
                                "needs a T2R language model (--arch t2r_lm*) with no --t2r-softmax-layers")
        return model

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        super().load_dataset(split, epoch, combine, **kwargs)
        if self.args.history_blocks and split == self.args.train_subset:
            blocks = self.datasets[split]  # MonolingualDataset over TokenBlockDataset over the split's lines
            self.datasets[split] = HistoryBlocks(
                blocks, token_stream(blocks.dataset.dataset), block=self.args.tokens_per_sample,
                max_blocks=self.args.history_blocks, eos=self.dictionary.eos(), seed=self.args.seed)
            logger.info(f"{split}: each batch reads up to {self.args.history_blocks} blocks of text before each "
                        f"training block into the recurrent state first (--history-blocks)")


@dataclass
class T2RTranslationConfig(TranslationConfig, ConvertFromConfig):
    pass


@register_task("t2r_translation", dataclass=T2RTranslationConfig)
class T2RTranslationTask(T2RTask, TranslationTask):
    pass
