"""T2R's options: the flags, declared once in T2RConfig (fairseq's parsers and t2r-convert are
generated from it), and T2ROptions, their values checked once when a model is built.

T2RConfig holds what the user typed (names start with `t2r_`: fairseq routes `decoder_`/`encoder_`
names into sub-configs); T2ROptions holds what the model uses (e.g. the softmax layers as a set of
indices). A new option is a field in each and a check in t2r_options.
"""
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Optional

from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.utils import safe_getattr
from omegaconf import OmegaConf, open_dict

from .checkpoints import load_checkpoint
from .decay import DECAYS, DEFAULT_MEMORY
from .errors import T2RUsageError
from .feature_maps import FEATURE_MAPS

logger = logging.getLogger(__name__)

CROSS_ATTENTION = ("t2r", "softmax")
UPDATES = ("add", "delta", "delta_norm")


@dataclass
class T2RConfig(FairseqDataclass):
    t2r_feature_map: ChoiceEnum(FEATURE_MAPS) = field(
        default="t2r", metadata={"help": "feature map phi: t2r = relu(Wx+b) learned (the paper's), "
                                         "elu = elu(x)+1, rfa = random Fourier features, hedgehog = "
                                         "softmax(+-(Wx+b)) learned, performer = positive random features"})
    t2r_feature_dim: int = field(
        default=32, metadata={"help": "feature size k per head (t2r: rows of W; rfa, hedgehog: 2k features; "
                                      "performer: k random features; elu ignores it: k = head dim)"})
    t2r_chunk_size: int = field(
        default=64, metadata={"help": "chunk length of the parallel causal form (speed/memory only)"})
    t2r_softmax_layers: str = field(
        default="", metadata={"help": "comma-separated decoder layer indices (from 0) that keep softmax "
                                      "self-attention (hybrid model), e.g. '3,7'"})
    t2r_cross_attention: ChoiceEnum(CROSS_ATTENTION) = field(
        default="t2r", metadata={"help": "encoder-decoder attention of translation models: t2r (the "
                                         "paper's) or keep softmax"})
    t2r_cross_feature_map: Optional[ChoiceEnum(FEATURE_MAPS)] = field(
        default=None, metadata={"help": "feature map of T2R cross-attention (translation models), chosen apart from "
                                        "self-attention's: sharp alignments may want another map; default: "
                                        "--t2r-feature-map"})
    t2r_cross_feature_dim: Optional[int] = field(
        default=None, metadata={"help": "feature size k per head of T2R cross-attention: its state is built once per "
                                        "sentence, so k costs k x d per step and nothing per source token; "
                                        "default: --t2r-feature-dim"})
    t2r_decay: ChoiceEnum(DECAYS) = field(
        default="none", metadata={"help": "decay of the T2R self-attention state, S_t = g S_{t-1} + k_t v_t^T: "
                                          "none (the paper's), fixed (a constant per head, RetNet's), learned "
                                          "(one trainable g per head) or gated (g_t from each position's "
                                          "input, as GLA); learned and gated start close to 1"})
    t2r_decay_memory: int = field(
        default=DEFAULT_MEMORY, metadata={"help": "where learned and gated decay start: head h first remembers about "
                                                  "M 2^h tokens, g_h = 1 - 1/(M 2^h); longer memories suit a state "
                                                  "carried across a long text"})
    t2r_window: int = field(
        default=0, metadata={"help": "sliding window W of T2R self-attention: each position attends with exact "
                                     "softmax to the last W positions (itself included) and linearly to older "
                                     "ones, in one normalisation with a learned per-head balance (LoLCATs); "
                                     "decoding keeps the last W keys beside the state. 0 = off (the paper's)"})

    t2r_update: ChoiceEnum(UPDATES) = field(
        default="add", metadata={"help": "how T2R self-attention writes its state: add (the paper's, S += phi(k) v^T) "
                                         "or delta (the delta rule: read what S holds for the unit-norm key and "
                                         "replace a learned share b_t of it by v_t; with --t2r-decay gated, Gated "
                                         "DeltaNet; read out through T2R's normaliser) or delta_norm (the same "
                                         "state, read out as DeltaNet does: unnormalised, then a per-head RMS "
                                         "norm)"})


# Every T2R flag's default, by field name (FairseqDataclass's own `_name` is not a flag).
T2R_DEFAULTS = {name: f.default for name, f in T2RConfig.__dataclass_fields__.items() if name.startswith("t2r_")}


def set_t2r_defaults(args):
    for name, default in T2R_DEFAULTS.items():
        setattr(args, name, safe_getattr(args, name, default))


def _finetune_source(args) -> Optional[str]:
    """The checkpoint `fairseq-train --finetune-from-model` is about to load into the model being built
    from `args`, or None. fairseq builds models from a node of its whole config (merge_with_parent keeps
    the node's parent), so the checkpoint options are one select away. None when fairseq will resume
    instead (a checkpoint_last.pt in --save-dir, or --restore-file): then the finetune file is not read."""
    if not OmegaConf.is_config(args):
        return None
    root = args._get_root()
    path = OmegaConf.select(root, "checkpoint.finetune_from_model", default=None)
    if not path or not os.path.isfile(path):
        return None  # fairseq names a missing file itself
    save_dir = OmegaConf.select(root, "checkpoint.save_dir", default=None) or ""
    restore = OmegaConf.select(root, "checkpoint.restore_file", default=None) or "checkpoint_last.pt"
    if restore != "checkpoint_last.pt" or os.path.isfile(os.path.join(save_dir, "checkpoint_last.pt")):
        return None
    return path


def _saved_t2r_options(path: str) -> Dict[str, object]:
    model_cfg = load_checkpoint(path)["cfg"]["model"]
    get = model_cfg.get if isinstance(model_cfg, dict) else lambda name, default: getattr(model_cfg, name, default)
    return {name: get(name, default) for name, default in T2R_DEFAULTS.items()}


def adopt_finetune_source_options(args):
    """A T2R checkpoint given to --finetune-from-model was built with T2R options (t2r-convert
    --t2r-feature-map hedgehog, say) that the model must repeat, or fairseq fails to load it with a
    page of missing keys. Options left at their defaults take the checkpoint's values (logged);
    an option given with another value than the checkpoint's is refused, naming both."""
    path = _finetune_source(args)
    if path is None:
        return
    for name, saved in _saved_t2r_options(path).items():
        value = safe_getattr(args, name, T2R_DEFAULTS[name])
        value = str(value) if isinstance(saved, str) else value  # ChoiceEnum values compare as str
        if value == saved:
            continue
        flag = "--" + name.replace("_", "-")
        if value != T2R_DEFAULTS[name]:
            raise T2ROptionError(f"{flag} {value} disagrees with --finetune-from-model {path}, which was built with "
                                 f"{flag} {saved}: drop {flag} (the checkpoint's value is then used) or give {saved}")
        logger.info(f"{flag} {saved}: read from --finetune-from-model {path}")
        with open_dict(args):
            setattr(args, name, saved)
        model_node = OmegaConf.select(args._get_root(), "model", default=None)
        if model_node is not None and model_node is not args:
            with open_dict(model_node):  # saved with the trained checkpoints, so they load as they were built
                model_node[name] = saved


@dataclass(frozen=True)
class T2ROptions:
    """The T2R options of one model, checked: what its decoder and attention layers are built from."""
    feature_map: str
    feature_dim: int
    chunk_size: int
    softmax_layers: FrozenSet[int]  # decoder layers that keep softmax self-attention
    cross_attention: str
    cross_feature_map: str  # of T2R cross-attention
    cross_feature_dim: int
    decay: str  # of the T2R self-attention state
    window: int  # of T2R self-attention: softmax over the last `window` positions; 0 = off
    update: str  # how T2R self-attention writes its state: add or delta
    decay_memory: int  # tokens the first head of a learned or gated decay remembers at first


class T2ROptionError(T2RUsageError):
    """A T2R option out of range; the message names the flag."""


def _positive_int(args, name: str) -> int:
    value = safe_getattr(args, name, T2R_DEFAULTS[name])
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise T2ROptionError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    return value


def _choice(args, name: str, choices) -> str:
    value = str(safe_getattr(args, name, T2R_DEFAULTS[name]))  # str() of fairseq's ChoiceEnum is its value
    if value not in choices:
        raise T2ROptionError(f"--{name.replace('_', '-')} {value!r}: choose one of {', '.join(choices)}")
    return value


def _softmax_layers(args) -> FrozenSet[int]:
    spec = str(safe_getattr(args, "t2r_softmax_layers", "") or "")
    try:
        indices = frozenset(int(i) for i in spec.split(",") if i.strip())
    except ValueError:
        raise T2ROptionError(f"--t2r-softmax-layers must be comma-separated layer indices such as 3,7, "
                             f"got {spec!r}") from None
    bad = sorted(i for i in indices if not 0 <= i < args.decoder_layers)
    if bad:
        raise T2ROptionError(f"--t2r-softmax-layers {bad} out of range for {args.decoder_layers} decoder layers "
                             f"(indices run from 0 to {args.decoder_layers - 1})")
    return indices


def _decay(args, softmax_layers: FrozenSet[int]) -> str:
    decay = _choice(args, "t2r_decay", DECAYS)
    if decay != "none" and len(softmax_layers) == args.decoder_layers:
        raise T2ROptionError(f"--t2r-decay {decay} decays the state of T2R self-attention, and every decoder layer "
                             f"keeps softmax self-attention (--t2r-softmax-layers); cross-attention has no time "
                             f"order to decay over: drop --t2r-decay or a layer from --t2r-softmax-layers")
    return decay


def _decay_memory(args) -> int:
    memory = _positive_int(args, "t2r_decay_memory")
    decay = _choice(args, "t2r_decay", DECAYS)
    if memory != DEFAULT_MEMORY and decay not in ("learned", "gated"):
        raise T2ROptionError(f"--t2r-decay-memory {memory} sets where a learned or gated decay starts, and --t2r-decay "
                             f"{decay} has none to start: add --t2r-decay gated (or learned) or drop it")
    return memory


def _window(args, softmax_layers: FrozenSet[int]) -> int:
    window = safe_getattr(args, "t2r_window", T2R_DEFAULTS["t2r_window"])
    positions = safe_getattr(args, "max_target_positions", None)
    if isinstance(window, bool) or not isinstance(window, int) or window < 0 or (positions and window > positions):
        limit = f" and the model's {positions} positions (--max-target-positions or --tokens-per-sample)" \
            if positions else ""
        raise T2ROptionError(f"--t2r-window must be an integer between 0 (off){limit}, got {window!r}")
    if window and len(softmax_layers) == args.decoder_layers:
        raise T2ROptionError(f"--t2r-window {window} is a window of T2R self-attention, and every decoder layer "
                             f"keeps softmax self-attention (--t2r-softmax-layers): drop --t2r-window or a layer "
                             f"from --t2r-softmax-layers")
    return window


def _cross_features(args, feature_map: str, feature_dim: int, cross_attention: str):
    """(map, size) of T2R cross-attention: self-attention's unless given."""
    given = [name for name in ("t2r_cross_feature_map", "t2r_cross_feature_dim")
             if safe_getattr(args, name, None) is not None]
    if given and cross_attention == "softmax":
        raise T2ROptionError(f"--{given[0].replace('_', '-')} sets the features of T2R cross-attention, and "
                             f"--t2r-cross-attention softmax keeps it softmax: drop one of them")
    cross_map = _choice(args, "t2r_cross_feature_map", FEATURE_MAPS) if "t2r_cross_feature_map" in given \
        else feature_map
    cross_dim = _positive_int(args, "t2r_cross_feature_dim") if "t2r_cross_feature_dim" in given else feature_dim
    return cross_map, cross_dim


def _update(args, softmax_layers: FrozenSet[int], window: int) -> str:
    update = _choice(args, "t2r_update", UPDATES)
    if update == "add":
        return update
    if len(softmax_layers) == args.decoder_layers:
        raise T2ROptionError(f"--t2r-update {update} sets how T2R self-attention writes its state, and every decoder "
                             f"layer keeps softmax self-attention (--t2r-softmax-layers): drop one of them")
    if window:
        raise T2ROptionError(f"--t2r-update {update} with --t2r-window {window}: the window's ring hands the key "
                             f"leaving it to an additive state, and the delta rule would have to write it: drop one")
    return update


def t2r_options(args) -> T2ROptions:
    """The checked T2R options of model args (argparse Namespace or fairseq config; missing
    options take T2RConfig's defaults). Raises T2ROptionError naming the flag."""
    softmax_layers = _softmax_layers(args)
    window = _window(args, softmax_layers)
    feature_map = _choice(args, "t2r_feature_map", FEATURE_MAPS)
    feature_dim = _positive_int(args, "t2r_feature_dim")
    cross_attention = _choice(args, "t2r_cross_attention", CROSS_ATTENTION)
    cross_map, cross_dim = _cross_features(args, feature_map, feature_dim, cross_attention)
    return T2ROptions(feature_map=feature_map,
                      feature_dim=feature_dim,
                      chunk_size=_positive_int(args, "t2r_chunk_size"),
                      softmax_layers=softmax_layers,
                      cross_attention=cross_attention,
                      cross_feature_map=cross_map,
                      cross_feature_dim=cross_dim,
                      decay=_decay(args, softmax_layers),
                      window=window,
                      update=_update(args, softmax_layers, window),
                      decay_memory=_decay_memory(args))
