"""Softmax -> T2R conversion: the weight transfer (used by the tasks' --convert-from) and the
offline converter `python -m t2r_fairseq.convert` / `t2r-convert`.

Every tensor with the same name and shape is reused unchanged; only the feature maps are new.
Anything else that does not line up is an error naming the tensor, never silently dropped.
"""
import argparse
import copy
import logging
import os
import sys
import tempfile
from argparse import Namespace
from enum import Enum
from types import SimpleNamespace
from typing import Dict, List

import torch
from omegaconf import OmegaConf

from .checkpoints import CheckpointError, checkpoint_arch, load_checkpoint

logger = logging.getLogger(__name__)

NEW_KEY_MARKER = ".feature_map."


def transfer_softmax_weights(model, source_state: Dict[str, torch.Tensor], source: str = "checkpoint") -> List[str]:
    """Load a softmax transformer's weights into a T2R `model`; returns the names of the new tensors."""
    if any(NEW_KEY_MARKER in k for k in source_state):
        raise CheckpointError(f"{source}: is already a T2R checkpoint (it has feature maps); --convert-from "
                              f"takes a softmax transformer checkpoint (use --finetune-from-model or "
                              f"--restore-file for a T2R one)")
    state = dict(source_state)
    model.upgrade_state_dict(state)  # e.g. split the packed in_proj of old fairseq checkpoints
    target = model.state_dict()
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in target.items() if k in state and state[k].shape != v.shape]
    if mismatched:
        raise CheckpointError(f"{source}: shapes do not match the chosen architecture (check --arch and "
                              f"its dimensions): " + "; ".join(mismatched[:5])
                              + (f"; and {len(mismatched) - 5} more" if len(mismatched) > 5 else ""))
    unexpected = sorted(k for k in state if k not in target)
    if unexpected:
        raise CheckpointError(f"{source}: has tensors the chosen architecture lacks (more layers, or another "
                              f"architecture?): {', '.join(unexpected[:5])}"
                              + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""))
    missing = [k for k in target if k not in state]
    not_new = [k for k in missing if NEW_KEY_MARKER not in k]
    if not_new:
        raise CheckpointError(f"{source}: lacks tensors of the chosen architecture (fewer layers, or another "
                              f"architecture?): {', '.join(not_new[:5])}")
    target.update({k: state[k] for k in target if k in state})
    model.load_state_dict(target, strict=True)
    return missing


# -- offline converter ------------------------------------------------------------------------
def _as_namespace(model_cfg) -> Namespace:
    if isinstance(model_cfg, Namespace):
        return copy.deepcopy(model_cfg)
    return Namespace(**{k: v for k, v in dict(model_cfg).items()})


def _vocab_size(weights: Dict[str, torch.Tensor], side: str) -> int:
    """Dictionary size, read off the input embedding (plain or adaptive input)."""
    plain = weights.get(f"{side}.embed_tokens.weight")
    if plain is not None:
        return plain.size(0)
    bands = [v.size(0) for k, v in weights.items()
             if k.startswith(f"{side}.embed_tokens.embeddings.") and k.endswith(".0.weight")]
    if not bands:
        raise CheckpointError(f"cannot find the {side} embedding in the checkpoint (character embeddings "
                              f"are not supported)")
    return sum(bands)


def placeholder_dictionary(size: int):
    """A placeholder dictionary of the right size: building the model needs only its length and
    special indices, which are fairseq's defaults."""
    from fairseq.data import Dictionary

    d = Dictionary()
    while len(d) < size:
        d.add_symbol(f"<t2r_placeholder_{len(d)}>")
    return d


def build_t2r_twin(state: dict, source: str, t2r_options: Dict[str, object]):
    """Build the T2R model matching a softmax checkpoint; returns (model, model_args)."""
    from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_REGISTRY, MODEL_REGISTRY

    from .models import set_t2r_defaults, twin_architecture_name

    arch = checkpoint_arch(state)
    if arch in ARCH_MODEL_REGISTRY and ARCH_MODEL_REGISTRY[arch] in (MODEL_REGISTRY["t2r_lm"],
                                                                    MODEL_REGISTRY["t2r_transformer"]):
        raise CheckpointError(f"{source}: is already a T2R model ({arch}); nothing to convert")
    twin = twin_architecture_name(arch or "")
    if arch not in ARCH_MODEL_REGISTRY or twin not in ARCH_MODEL_REGISTRY:
        raise CheckpointError(f"{source}: cannot convert architecture {arch!r}; t2r_fairseq converts "
                              f"transformer_lm* and transformer* checkpoints")
    args = _as_namespace(state["cfg"]["model"])
    args.arch, args._name = twin, "t2r_lm" if twin.startswith("t2r_lm") else "t2r_transformer"
    for name, value in t2r_options.items():
        if value is not None:
            setattr(args, name, value)
    set_t2r_defaults(args)
    ARCH_CONFIG_REGISTRY[twin](args)
    weights = state["model"]
    if args._name == "t2r_lm":
        d = placeholder_dictionary(_vocab_size(weights, "decoder"))
        task = SimpleNamespace(source_dictionary=d, target_dictionary=d)
    else:
        task = SimpleNamespace(source_dictionary=placeholder_dictionary(_vocab_size(weights, "encoder")),
                               target_dictionary=placeholder_dictionary(_vocab_size(weights, "decoder")))
    return ARCH_MODEL_REGISTRY[twin].build_model(args, task), args


def atomic_torch_save(obj, path: str):
    """Write to a temporary file beside `path`, then rename: never a half-written checkpoint."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".t2r-convert-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def convert_checkpoint(input_path: str, output_path: str, **t2r_options) -> List[str]:
    state = load_checkpoint(input_path)
    model, args = build_t2r_twin(state, input_path, t2r_options)
    new_keys = transfer_softmax_weights(model, state["model"], source=input_path)
    out = {k: v for k, v in state.items() if k not in ("model", "last_optimizer_state", "cfg")}
    # Plain containers, as fairseq's trainer saves them: torch's safe loading refuses omegaconf objects.
    out["cfg"] = OmegaConf.to_container(state["cfg"], resolve=True, enum_to_str=True)
    model_cfg = {k: v.value if isinstance(v, Enum) else v for k, v in vars(args).items()}
    out["cfg"]["model"] = Namespace(**model_cfg) if isinstance(state["cfg"]["model"], Namespace) else model_cfg
    out["model"] = model.state_dict()
    atomic_torch_save(out, output_path)
    return new_keys


def main(argv=None):
    from .feature_maps import FEATURE_MAPS

    parser = argparse.ArgumentParser(
        prog="t2r-convert", description="Convert a fairseq softmax transformer checkpoint (transformer_lm* or "
        "transformer*) into a T2R checkpoint of the matching t2r_* architecture. Weights are copied unchanged; "
        "feature maps are freshly initialized. Finetune with fairseq-train --finetune-from-model.")
    parser.add_argument("--input", required=True, help="softmax checkpoint (.pt)")
    parser.add_argument("--output", required=True, help="where to write the T2R checkpoint")
    parser.add_argument("--t2r-feature-map", choices=FEATURE_MAPS, default=None)
    parser.add_argument("--t2r-feature-dim", type=int, default=None)
    parser.add_argument("--t2r-softmax-layers", default=None, help="e.g. 3,7: decoder layers kept softmax")
    parser.add_argument("--t2r-cross-attention", choices=("t2r", "softmax"), default=None)
    args = parser.parse_args(argv)
    if args.t2r_feature_dim is not None and args.t2r_feature_dim <= 0:
        parser.error(f"--t2r-feature-dim must be positive, got {args.t2r_feature_dim}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from . import checkpoints, models, tasks  # noqa: F401  (register the models)
    checkpoints.allow_fairseq_checkpoints()
    try:
        new_keys = convert_checkpoint(args.input, args.output, t2r_feature_map=args.t2r_feature_map,
                                      t2r_feature_dim=args.t2r_feature_dim,
                                      t2r_softmax_layers=args.t2r_softmax_layers,
                                      t2r_cross_attention=args.t2r_cross_attention)
    except (CheckpointError, ValueError) as e:
        print(f"t2r-convert: error: {e}", file=sys.stderr)
        return 2
    logger.info(f"wrote {args.output}: {len(new_keys)} new tensors ({', '.join(new_keys)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
