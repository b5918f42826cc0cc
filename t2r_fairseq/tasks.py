"""Conversion tasks: `t2r_language_modeling` and `t2r_translation`.

They are fairseq's language_modeling / translation plus `--convert-from PATH`: when training
starts fresh, the T2R model is initialized from that softmax checkpoint (see convert.py). When
there is something to resume from, fairseq's normal resume wins and nothing is converted.
"""
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

from fairseq.tasks import register_task
from fairseq.tasks.language_modeling import LanguageModelingConfig, LanguageModelingTask
from fairseq.tasks.translation import TranslationConfig, TranslationTask
from omegaconf import II

from .checkpoints import load_checkpoint
from .convert import transfer_softmax_weights

logger = logging.getLogger(__name__)


@dataclass
class ConvertFromConfig:
    convert_from: Optional[str] = field(
        default=None, metadata={"help": "softmax transformer checkpoint to initialize the T2R model from "
                                        "when training starts fresh (ignored when resuming)"})
    # Read, not set: conversion must not run when fairseq is about to resume.
    save_dir: str = II("checkpoint.save_dir")
    restore_file: str = II("checkpoint.restore_file")


def _resume_checkpoint(cfg) -> Optional[str]:
    """The checkpoint fairseq's load_checkpoint will resume from, if any (same rule as fairseq)."""
    restore = cfg.restore_file or "checkpoint_last.pt"
    path = os.path.join(cfg.save_dir, "checkpoint_last.pt") if restore == "checkpoint_last.pt" else restore
    return path if os.path.isfile(path) else None


def convert_on_fresh_start(task, model, from_checkpoint: bool):
    # language_modeling is a legacy task (config in .args), translation a dataclass one (.cfg).
    task_cfg = task.cfg if task.cfg is not None else task.args
    if not task_cfg.convert_from or from_checkpoint:
        return model
    resume = _resume_checkpoint(task_cfg)
    if resume is not None:
        logger.info(f"resuming from {resume}: skipping --convert-from {task_cfg.convert_from}")
        return model
    state = load_checkpoint(task_cfg.convert_from)
    new_keys = transfer_softmax_weights(model, state["model"], source=task_cfg.convert_from)
    logger.info(f"converted {task_cfg.convert_from}: reused {len(model.state_dict()) - len(new_keys)} tensors, "
                f"{len(new_keys)} new: {', '.join(new_keys)}")
    return model


@dataclass
class T2RLanguageModelingConfig(LanguageModelingConfig, ConvertFromConfig):
    pass


@register_task("t2r_language_modeling", dataclass=T2RLanguageModelingConfig)
class T2RLanguageModelingTask(LanguageModelingTask):
    def build_model(self, cfg, from_checkpoint=False):
        return convert_on_fresh_start(self, super().build_model(cfg, from_checkpoint), from_checkpoint)


@dataclass
class T2RTranslationConfig(TranslationConfig, ConvertFromConfig):
    pass


@register_task("t2r_translation", dataclass=T2RTranslationConfig)
class T2RTranslationTask(TranslationTask):
    def build_model(self, cfg, from_checkpoint=False):
        return convert_on_fresh_start(self, super().build_model(cfg, from_checkpoint), from_checkpoint)
