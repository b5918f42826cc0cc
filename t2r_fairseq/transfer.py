"""Softmax -> T2R weight transfer: the library behind the tasks' --convert-from and `t2r-convert`.

Every tensor with the same name and shape is reused unchanged; only the feature maps (and a
decay's gates, a window's balance) are new.
Anything else that does not line up is an error naming the tensor, never silently dropped.
"""
import copy
from argparse import Namespace
from enum import Enum
from types import SimpleNamespace
from typing import Dict, List, Optional, Tuple

import torch
from fairseq.data import Dictionary
from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_REGISTRY
from omegaconf import OmegaConf

from .attention import T2RCrossAttention, T2RSelfAttention
from .checkpoints import CheckpointError, checkpoint_arch
from .errors import T2RUsageError
from .models import T2RLanguageModel, T2RTransformerModel, twin_architecture_name
from .options import set_t2r_defaults

# What a softmax transformer does not have: the feature maps, the decay of the state (decay.py), the
# window's balance between its softmax and linear parts (window_attention.py) and the delta rule's
# write strength (delta_rule.py).
NEW_KEY_MARKERS = (".feature_map.", ".decay.", ".log_balance", ".write_strength.", ".readout_norm.")


def is_new_tensor(name: str) -> bool:
    """Whether a T2R model's tensor `name` is one that conversion initializes (not reused)."""
    return any(marker in name for marker in NEW_KEY_MARKERS)


def attention_parameters(model) -> List[torch.nn.Parameter]:
    """The parameters of the model's T2R attention modules, self- and cross-attention (q/k/v/out
    projections, feature maps, decay gates, window balances): what --t2r-finetune attention trains.
    Attention kept softmax (--t2r-softmax-layers, --t2r-cross-attention softmax, the encoder) is not T2R."""
    return [p for module in model.modules() if isinstance(module, (T2RSelfAttention, T2RCrossAttention))
            for p in module.parameters()]


def require_t2r_attention(model):
    """Conversion into a model whose every attention stays softmax would write the teacher back
    under a T2R name, "0 new" tensors and nothing else said: refuse, naming the flags."""
    if attention_parameters(model):
        return
    layers = len(model.decoder.layers)
    cross = " and --t2r-cross-attention softmax" if isinstance(model, T2RTransformerModel) else ""
    raise T2RUsageError(f"--t2r-softmax-layers covers all {layers} decoder layers{cross}: every attention stays "
                        f"softmax and nothing would be converted; keep at least one layer T2R (indices run from 0 "
                        f"to {layers - 1})" + (" or use --t2r-cross-attention t2r" if cross else ""))


def transfer_softmax_weights(model, source_state: Dict[str, torch.Tensor], source: str = "checkpoint") -> List[str]:
    """Load a softmax transformer's weights into a T2R `model`; returns the names of the new tensors."""
    if any(is_new_tensor(k) for k in source_state):
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
    not_new = [k for k in missing if not is_new_tensor(k)]
    if not_new:
        raise CheckpointError(f"{source}: lacks tensors of the chosen architecture (fewer layers, or another "
                              f"architecture?): {', '.join(not_new[:5])}")
    # Tensors the model ties (--share-all-embeddings, --share-decoder-input-output-embed) are one
    # tensor: loading would silently keep whichever copy comes last.
    tied = {}
    for k, v in target.items():
        tied.setdefault(v.data_ptr(), []).append(k)
    for names in (n for n in tied.values() if len(n) > 1 and all(k in state for k in n)):
        if any(not torch.equal(state[names[0]], state[k]) for k in names[1:]):
            raise CheckpointError(f"{source}: {' and '.join(names)} differ, and the chosen architecture ties them "
                                  f"(--share-all-embeddings or --share-decoder-input-output-embed): build the "
                                  f"model with the teacher's sharing flags")
    target.update({k: state[k] for k in target if k in state})
    model.load_state_dict(target, strict=True)
    return missing


def placeholder_dictionary(size: int) -> Dictionary:
    """A placeholder dictionary of the right size: building the model needs only its length and
    special indices, which are fairseq's defaults."""
    d = Dictionary()
    while len(d) < size:
        d.add_symbol(f"<t2r_placeholder_{len(d)}>")
    return d


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


def _as_namespace(model_cfg) -> Namespace:
    if isinstance(model_cfg, Namespace):
        return copy.deepcopy(model_cfg)
    return Namespace(**{k: v for k, v in dict(model_cfg).items()})


def build_t2r_twin(state: dict, source: str, overrides: Dict[str, Optional[object]]):
    """Build the T2R model matching a softmax checkpoint, with T2R options `overrides` (None: the
    architecture's default); returns (model, model_args)."""
    arch = checkpoint_arch(state)
    if arch in ARCH_MODEL_REGISTRY and issubclass(ARCH_MODEL_REGISTRY[arch], (T2RLanguageModel, T2RTransformerModel)):
        raise CheckpointError(f"{source}: is already a T2R model ({arch}); nothing to convert: finetune it "
                              f"with fairseq-train --finetune-from-model, or use it as it is")
    twin = twin_architecture_name(arch or "")
    if arch not in ARCH_MODEL_REGISTRY or twin not in ARCH_MODEL_REGISTRY:
        raise CheckpointError(f"{source}: cannot convert architecture {arch!r}; t2r_fairseq converts "
                              f"transformer_lm* and transformer* checkpoints")
    args = _as_namespace(state["cfg"]["model"])
    args.arch, args._name = twin, "t2r_lm" if twin.startswith("t2r_lm") else "t2r_transformer"
    for name, value in overrides.items():
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


def convert_state(state: dict, source: str, overrides: Dict[str, Optional[object]]) -> Tuple[dict, List[str]]:
    """A softmax checkpoint's contents -> (the T2R checkpoint's contents, names of the new tensors).
    Weights are copied unchanged; the optimizer state is dropped."""
    model, args = build_t2r_twin(state, source, overrides)
    require_t2r_attention(model)
    new_keys = transfer_softmax_weights(model, state["model"], source=source)
    out = {k: v for k, v in state.items() if k not in ("model", "last_optimizer_state", "cfg")}
    # Plain containers, as fairseq's trainer saves them: torch's safe loading refuses omegaconf objects.
    out["cfg"] = OmegaConf.to_container(state["cfg"], resolve=True, enum_to_str=True)
    model_cfg = {k: v.value if isinstance(v, Enum) else v for k, v in vars(args).items()}
    out["cfg"]["model"] = Namespace(**model_cfg) if isinstance(state["cfg"]["model"], Namespace) else model_cfg
    out["model"] = model.state_dict()
    return out, new_keys
