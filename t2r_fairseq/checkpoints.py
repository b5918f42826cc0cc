"""Reading fairseq checkpoints safely under torch >= 2.6, and clear errors for bad files.

torch.load now defaults to weights_only=True, which refuses the argparse.Namespace (and a few
numpy scalars) that fairseq stores in every checkpoint, so fairseq's own CLIs cannot load any
checkpoint. Rather than turning safe loading off, we allow exactly those types.
"""
import argparse
import os

import numpy as np
import torch
from numpy._core import multiarray
from fairseq import checkpoint_utils

from .errors import T2RUsageError


class CheckpointError(T2RUsageError):
    """A checkpoint that cannot be used as asked; the message names the file and the fix."""


def allow_fairseq_checkpoints():
    add = getattr(torch.serialization, "add_safe_globals", None)
    if add is None:  # torch < 2.4 loads everything anyway
        return
    safe = [argparse.Namespace, np.dtype, np.ndarray]
    safe += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    # numpy 2 pickles these as numpy._core.multiarray.*, numpy 1 as numpy.core.multiarray.*: allow
    # both spellings, so a checkpoint written under either numpy loads under the other. (numpy
    # 1.26 serves numpy._core.multiarray too, as an alias of numpy.core.multiarray.)
    for obj in (multiarray.scalar, multiarray._reconstruct):
        safe += [(obj, f"{module}.multiarray.{obj.__name__}") for module in ("numpy.core", "numpy._core")]
    add(safe)


def load_checkpoint(path: str) -> dict:
    """fairseq's loader (which upgrades old 'args' checkpoints to 'cfg'), with one-line errors."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        state = checkpoint_utils.load_checkpoint_to_cpu(path)
    except Exception as e:  # torch raises many types for truncated or foreign files
        raise CheckpointError(f"{path}: not a readable fairseq checkpoint ({type(e).__name__}: "
                              f"{_load_failure(e)})") from None
    if not isinstance(state, dict) or "model" not in state or state.get("cfg") is None:
        raise CheckpointError(f"{path}: not a fairseq checkpoint (no 'model' weights and 'cfg')")
    return state


def _load_failure(e: Exception) -> str:
    """The reason torch gives, without the advice of its weights-only loader to load the file unsafely:
    a file that is not a fairseq checkpoint does not become one that way."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for line in lines:
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].strip()
    if lines and lines[0].startswith("Weights only load failed"):
        return "not a torch checkpoint file"
    return lines[0] if lines else "unreadable"


def checkpoint_arch(state: dict) -> str:
    model_cfg = state["cfg"]["model"]
    arch = model_cfg.get("arch") if isinstance(model_cfg, dict) else getattr(model_cfg, "arch", None)
    return arch or (model_cfg.get("_name") if isinstance(model_cfg, dict) else getattr(model_cfg, "_name", None))
