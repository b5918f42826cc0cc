"""T2R attention modules, drop-ins for fairseq's MultiheadAttention: T2RSelfAttention (causal, the
decoder's self-attention) and T2RCrossAttention (encoder-decoder attention).

Both have fairseq's parameter names (q_proj, k_proj, v_proj, out_proj; plus feature_map), so a
softmax checkpoint and every T2R checkpoint load by name, and fairseq's forward contract on
(time, batch, channel) tensors, returning (out, None): linear attention forms no weights.

Each keeps one state, only in fairseq's incremental_state: the packed [S | z] of linear_attention.py,
(batch, heads, features, head_dim + 1) (with a sliding window, also window_attention.py's ring of
the last W positions and the position reached), batch-first so that beam search reorders it with one
index_select per tensor. The values that build it are v1 = [v | 1]; the column of ones is made in
one place, _value_weights, as one more output per head of the value projection.
"""
import math
from typing import Dict, NamedTuple, Optional, Tuple

import torch
from fairseq.incremental_decoding_utils import with_incremental_state
from torch import Tensor, nn

from .decay import DEFAULT_MEMORY, build_decay
from .delta_rule import chunked_delta_rule, delta_rule_step
from .feature_maps import T2RFeatureMap, build_feature_map
from .linear_attention import (DEFAULT_CHUNK_SIZE, accumulation_dtype, normalize_packed, packed_causal_linear_attention,
                               packed_linear_attention_read, packed_linear_attention_state,
                               packed_linear_attention_step)
from .window_attention import WindowState, window_attention, window_attention_step

IncrementalState = Optional[Dict[str, Dict[str, Optional[Tensor]]]]


@with_incremental_state
class _LinearAttention(nn.Module):
    """What both roles share: parameters, head reshaping, the value projection with its column of
    ones, and the state's place in incremental_state."""

    def __init__(self, embed_dim: int, num_heads: int, *, feature_map: str, feature_dim: int,
                 kdim: Optional[int] = None, vdim: Optional[int] = None):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(kdim or embed_dim, embed_dim)
        self.v_proj = nn.Linear(vdim or embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.feature_map = build_feature_map(feature_map, num_heads, self.head_dim, feature_dim)
        self.reset_parameters()

    def reset_parameters(self):
        # fairseq's MultiheadAttention init, so a T2R model trained from scratch starts alike.
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(proj.weight, gain=2 ** -0.5)
        nn.init.xavier_uniform_(self.out_proj.weight)
        nn.init.constant_(self.out_proj.bias, 0.0)

    # -- shapes -----------------------------------------------------------------------------
    def _heads(self, x: Tensor) -> Tensor:
        """(time, batch, heads * d) -> (batch, heads, time, d)"""
        time, batch, _ = x.shape
        return x.view(time, batch, self.num_heads, -1).permute(1, 2, 0, 3)

    def _merge(self, x: Tensor) -> Tensor:
        """(batch, heads, time, head_dim) -> (time, batch, embed), then the output projection."""
        batch, _, time, _ = x.shape
        return self.out_proj(x.permute(2, 0, 1, 3).reshape(time, batch, self.embed_dim))

    def _features(self, proj: nn.Linear, x: Tensor) -> Tensor:
        """phi(proj(x)): (time, batch, .) -> (batch, heads, time, features)"""
        return self.feature_map(self._heads(proj(x)))

    @staticmethod
    def _drop_padding(k: Tensor, key_padding_mask: Optional[Tensor]) -> Tensor:
        # A zero feature vector adds nothing to S or z: padded keys never enter the state.
        if key_padding_mask is None:
            return k
        return k.masked_fill(key_padding_mask.bool()[:, None, :, None], 0.0)

    def _value_weights(self) -> Tuple[Tensor, Tensor]:
        """v_proj's (weight, bias) with one more output per head that is always 1 (zero weights,
        bias 1): x -> v1 = [v | 1] per head, the values of the packed state [S | z]. Made in the
        matmul, the column costs decoding nothing."""
        weight = self.v_proj.weight.view(self.num_heads, self.head_dim, -1)
        bias = self.v_proj.bias.view(self.num_heads, self.head_dim)
        weight = torch.cat([weight, weight.new_zeros(self.num_heads, 1, weight.size(-1))], dim=1)
        bias = torch.cat([bias, bias.new_ones(self.num_heads, 1)], dim=1)
        return weight.flatten(0, 1), bias.flatten()

    # -- fairseq incremental-state protocol -------------------------------------------------
    def _get_input_buffer(self, incremental_state: IncrementalState) -> Dict[str, Optional[Tensor]]:
        result = self.get_incremental_state(incremental_state, "t2r_state")
        return {} if result is None else result

    def _set_input_buffer(self, incremental_state: IncrementalState, buffer: Dict[str, Optional[Tensor]]):
        return self.set_incremental_state(incremental_state, "t2r_state", buffer)

    def _saved_state(self, incremental_state: IncrementalState) -> Optional[Tensor]:
        return self._get_input_buffer(incremental_state).get("state")

    def _save_state(self, incremental_state: IncrementalState, state: Tensor):
        self._set_input_buffer(incremental_state, {"state": state})

    @torch.jit.unused
    def reorder_incremental_state(self, incremental_state: IncrementalState, new_order: Tensor):
        """Beam search: the state is batch-first, so reordering is one index_select per tensor (a
        number, the window's position, is the same for every row)."""
        buffer = self._get_input_buffer(incremental_state)
        if buffer:
            self._set_input_buffer(incremental_state, {name: t.index_select(0, new_order) if torch.is_tensor(t) else t
                                                       for name, t in buffer.items()})
        return incremental_state

    # -- checkpoint compatibility -----------------------------------------------------------
    def upgrade_state_dict_named(self, state_dict, name):
        """Old fairseq checkpoints keep q/k/v as one in_proj matrix: split it, as fairseq does."""
        prefix = name + "." if name else ""
        for kind in ("weight", "bias"):
            packed = state_dict.pop(f"{prefix}in_proj_{kind}", None)
            if packed is not None:
                for part, proj in zip(packed.chunk(3, dim=0), ("q_proj", "k_proj", "v_proj")):
                    state_dict[f"{prefix}{proj}.{kind}"] = part


class Projection(NamedTuple):
    """What the forms of T2RSelfAttention read, computed from the input: phi(q), phi(k): (batch,
    heads, time, features) (padded keys zero), v1: (batch, heads, time, head_dim + 1), the log-gates
    (broadcasting to (batch, heads, time); None without decay), the padding, (batch, time) or None,
    and for a form that reads them (the window's) the raw q and k: (batch, heads, time, head_dim)
    and the balance log_balance: (heads,) (else None)."""
    q: Tensor
    k: Tensor
    v1: Tensor
    log_g: Optional[Tensor]
    padding: Optional[Tensor]
    raw_q: Optional[Tensor]
    raw_k: Optional[Tensor]
    log_balance: Optional[Tensor]
    beta: Optional[Tensor] = None  # the delta rule's write strengths, (batch, heads, time), 0 at padding


class LinearForm:
    """Plain causal linear attention (linear_attention.py). Its state is the packed [S | z], kept in
    the incremental-state buffer as "state"."""
    reads_raw_qk = False

    def __init__(self, chunk_size: int):
        self.chunk_size = chunk_size

    def parallel(self, p: Projection, state: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        return packed_causal_linear_attention(p.q, p.k, p.v1, initial_state=state, log_g=p.log_g,
                                              chunk_size=self.chunk_size)

    def step(self, p: Projection, state: Optional[Tensor], inplace: bool) -> Tuple[Tensor, Tensor]:
        return packed_linear_attention_step(p.q, p.k, p.v1, state, log_g=p.log_g, inplace=inplace)

    @staticmethod
    def load(buffer: Dict[str, Optional[Tensor]]) -> Optional[Tensor]:
        return buffer.get("state")

    @staticmethod
    def save(state: Tensor) -> Dict[str, Optional[Tensor]]:
        return {"state": state}


class DeltaForm(LinearForm):
    """The delta rule (delta_rule.py) on the packed [S | z]: each position first reads what the state
    holds for its key and replaces b_t of it (z, the normaliser, follows the same update), so the state
    can overwrite instead of only adding. Keys and queries are the features, L2-normalised (unit keys
    make each step a contraction). The read-out is T2R's, numerator over normaliser from one product,
    or with readout_norm (--t2r-update delta_norm) DeltaNet's: the numerator alone through a per-head
    RMS norm. Its state is the linear form's, "state" in the buffer."""

    def __init__(self, chunk_size: int, readout_norm: Optional[nn.Module] = None):
        super().__init__(chunk_size)
        self.readout_norm = readout_norm

    def parallel(self, p: Projection, state: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        q, k = _unit(p.q), _unit(p.k)
        out, state = chunked_delta_rule(q, k, p.v1, p.beta, initial_state=state, log_g=p.log_g,
                                        chunk_size=self.chunk_size)
        return self._read(out), state

    def step(self, p: Projection, state: Optional[Tensor], inplace: bool) -> Tuple[Tensor, Tensor]:
        out, state = delta_rule_step(_unit(p.q), _unit(p.k), p.v1, p.beta, state, log_g=p.log_g, inplace=inplace)
        return self._read(out), state

    def _read(self, packed: Tensor) -> Tensor:
        if self.readout_norm is None:
            return normalize_packed(packed)
        return self.readout_norm(packed[..., :-1])  # DeltaNet's: S q, then the per-head RMS norm


def _unit(x: Tensor) -> Tensor:
    # An all-zero feature vector (a padded key, relu features all off) stays zero: it writes nothing.
    return nn.functional.normalize(x, dim=-1, eps=1e-6)


class WindowForm:
    """Sliding-window softmax + linear attention (window_attention.py), window W. Its state is
    window_attention.WindowState: [S | z] under "state" (as the linear form's), the ring's keys,
    values and features, the position and, after padding, the ring's validity beside it."""
    reads_raw_qk = True

    def __init__(self, window: int, chunk_size: int):
        self.window, self.chunk_size = window, chunk_size

    def parallel(self, p: Projection, state: Optional[WindowState]) -> Tuple[Tensor, WindowState]:
        return window_attention(p.q, p.k, p.v1, p.raw_q, p.raw_k, window=self.window, log_balance=p.log_balance,
                                initial_state=state, log_g=p.log_g, padding=p.padding, chunk_size=self.chunk_size)

    def step(self, p: Projection, state: Optional[WindowState], inplace: bool) -> Tuple[Tensor, WindowState]:
        return window_attention_step(p.q, p.k, p.v1, p.raw_q, p.raw_k, state, window=self.window,
                                     log_balance=p.log_balance, log_g=p.log_g, padding=p.padding, inplace=inplace)

    @staticmethod
    def load(buffer: Dict[str, Optional[Tensor]]) -> Optional[WindowState]:
        if not buffer:
            return None
        return WindowState(buffer["state"], buffer["keys"], buffer["values"], buffer["features"], buffer["position"],
                           buffer.get("valid"))

    @staticmethod
    def save(state: WindowState) -> Dict[str, Optional[Tensor]]:
        buffer = {"state": state.packed, "keys": state.keys, "values": state.values, "features": state.features,
                  "position": state.position}
        if state.valid is not None:
            buffer["valid"] = state.valid
        return buffer


class T2RSelfAttention(_LinearAttention):
    """Causal self-attention. Without incremental_state: the chunked parallel form (chunk_size:
    speed and memory only). With it, the call continues the state saved there and saves the final
    one: one new position is a decode step (constant cost, in place when autograd is off), several
    (a prompt, a block of a stream: see `prefill`) run the chunked form from the saved state.

    The form of the attention (LinearForm, WindowForm: each a parallel call, a one-step call and its
    state's conversion to and from the incremental-state buffer) is chosen once, here; forward calls it.

    fold_feature_map (T2R's map only, whose first layer is linear): phi(y) = relu(W y + b) is
    folded into q_proj and k_proj, and q, k and v come out of one matmul; False runs the textbook
    form (projections, then the feature map). Both compute the same function of the same parameters.
    A window needs the raw q and k as well, so with one the form is always the textbook one (folding
    would only add the folded rows to the matmul).

    decay (decay.py): none, fixed, learned or gated decay of the state, g_t per head. A padded key
    position leaves the state as it was: its features are zero and its gate is 1.

    window W > 0 (window_attention.py): each query attends with exact softmax to the last W
    positions and linearly to older ones, in one normalisation, the linear scores weighted by
    exp(log_balance) per head; decoding keeps a ring of the last W keys beside [S | z]. 0: off,
    no new tensors, today's computation.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, feature_map: str = "t2r", feature_dim: int = 32,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, fold_feature_map: bool = True, decay: str = "none",
                 window: int = 0, update: str = "add", decay_memory: int = DEFAULT_MEMORY):
        super().__init__(embed_dim, num_heads, feature_map=feature_map, feature_dim=feature_dim)
        if window and update != "add":
            raise ValueError("a window's ring hands its oldest key to an additive state; the delta rule has no window")
        self.window = window
        # DeltaNet's read-out normalises each head's output to a learned RMS (gain 1 at first).
        self.readout_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if update == "delta_norm" else None
        self.form = (WindowForm(window, chunk_size) if window else LinearForm(chunk_size) if update == "add"
                     else DeltaForm(chunk_size, self.readout_norm))
        self.folded = fold_feature_map and isinstance(self.feature_map, T2RFeatureMap) and not self.form.reads_raw_qk
        self.decay = build_decay(decay, num_heads, embed_dim, decay_memory)
        if window:
            # beta = 1 / features: phi(q).phi(k) sums that many products, so one older key starts on the
            # scale of a softmax key scoring ~0 and the window's high-scoring keys dominate a converted
            # model at first; training (the attention-transfer criterion too) moves it.
            self.log_balance = nn.Parameter(torch.full((num_heads,), -math.log(self.feature_map.feature_dim)))
        else:
            self.register_parameter("log_balance", None)
        # The delta rule's write strength b_t = sigmoid(w . x_t + b) per head, in the fused input matmul.
        # Zero weight: every position starts writing half of the difference; gradients still reach it.
        self.write_strength = None
        if update != "add":
            self.write_strength = nn.Linear(embed_dim, num_heads)
            nn.init.zeros_(self.write_strength.weight)
            nn.init.zeros_(self.write_strength.bias)

    @property
    def chunk_size(self) -> int:
        return self.form.chunk_size

    def forward(self, query: Tensor, key: Optional[Tensor] = None, value: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None, incremental_state: IncrementalState = None,
                need_weights: bool = True, static_kv: bool = False, attn_mask: Optional[Tensor] = None,
                before_softmax: bool = False, need_head_weights: bool = False) -> Tuple[Tensor, None]:
        """query: (time, batch, embed). Keys and values come from query, as in fairseq's
        self-attention (key and value are ignored); attn_mask is ignored: causal by construction."""
        p = self._project(query, key_padding_mask, incremental_state)
        saved = self.form.load(self._get_input_buffer(incremental_state))
        if incremental_state is not None and query.size(0) == 1:
            out, state = self.form.step(p, saved, inplace=not torch.is_grad_enabled())
        else:
            out, state = self.form.parallel(p, saved)
        if incremental_state is not None and state is not saved:
            self._set_input_buffer(incremental_state, self.form.save(state))
        return self._merge(out), None

    def _project(self, x: Tensor, key_padding_mask: Optional[Tensor], incremental_state: IncrementalState
                 ) -> Projection:
        """What the form reads (Projection), from one matmul."""
        weights = self._weights(incremental_state)
        qkv = nn.functional.linear(x, weights["weight"], weights["bias"])
        width = self.num_heads * self.feature_map.feature_dim if self.folded else self.embed_dim
        if self.folded:
            torch.relu_(qkv[..., :2 * width])  # the map's relu; its linear layer is in the weights
        gate_width = self.num_heads if self.decay is not None and self.decay.from_input else 0
        beta_width = self.num_heads if self.write_strength is not None else 0
        q, k, v1, gate_logits, beta_logits = qkv.split(
            [width, width, qkv.size(-1) - 2 * width - gate_width - beta_width, gate_width, beta_width], dim=-1)
        q, k, v1 = self._heads(q), self._heads(k), self._heads(v1)
        raw_q, raw_k = (q, k) if self.form.reads_raw_qk else (None, None)  # never folded then
        if not self.folded:  # one call: the map treats every row alike
            q, k = self.feature_map(torch.cat([q, k])).chunk(2)
        log_g = self.decay.log_gates(gate_logits) if gate_width else weights.get("log_g")
        if log_g is not None and key_padding_mask is not None:
            log_g = log_g.masked_fill(key_padding_mask.bool()[:, None, :], 0.0)  # gate 1: a pad decays nothing
        beta = None
        if beta_width:
            beta = torch.sigmoid(beta_logits.to(accumulation_dtype(beta_logits))).permute(1, 2, 0)
            if key_padding_mask is not None:
                beta = beta.masked_fill(key_padding_mask.bool()[:, None, :], 0.0)  # a pad writes nothing
        return Projection(q, self._drop_padding(k, key_padding_mask), v1, log_g, key_padding_mask, raw_q, raw_k,
                          self.log_balance, beta)

    def _weights(self, incremental_state: IncrementalState) -> Dict[str, Tensor]:
        """What the forward pass derives from the parameters: (weight, bias) of the matmul
        x -> [q | k | v1 | gate logits], folded if self.folded, and the per-head log-gates of a fixed
        or learned decay.

        With autograd on they are built on every call, so gradients reach every parameter as in
        the textbook form. Without autograd, decoding builds them once per run and keeps them in
        that run's incremental_state: weights cannot change in the middle of a generation, and a
        new generation (a new incremental_state) builds from the current weights, so no cache can
        go stale (fairseq's optimizers update .data, which no version counter sees)."""
        if incremental_state is None or torch.is_grad_enabled():
            return self._build_weights()
        cached = self.get_incremental_state(incremental_state, "t2r_projection")
        if cached is None:
            cached = self._build_weights()
            self.set_incremental_state(incremental_state, "t2r_projection", cached)
        return cached

    def _build_weights(self) -> Dict[str, Tensor]:
        if self.folded:
            (wq, bq), (wk, bk) = self._fold(self.q_proj), self._fold(self.k_proj)
        else:
            (wq, bq), (wk, bk) = (self.q_proj.weight, self.q_proj.bias), (self.k_proj.weight, self.k_proj.bias)
        rows = [(wq, bq), (wk, bk), self._value_weights()]
        if self.decay is not None and self.decay.from_input:
            rows.append((self.decay.weight.to(wq.dtype), self.decay.bias.to(wq.dtype)))
        if self.write_strength is not None:
            rows.append((self.write_strength.weight.to(wq.dtype), self.write_strength.bias.to(wq.dtype)))
        weights = {"weight": torch.cat([w for w, _ in rows]), "bias": torch.cat([b for _, b in rows])}
        if self.decay is not None and not self.decay.from_input:
            weights["log_g"] = self.decay.log_gates()
        return weights

    def _fold(self, proj: nn.Linear) -> Tuple[Tensor, Tensor]:
        """(weight, bias) of x -> W proj(x) + b per head: W (W_p x + b_p) + b = (W W_p) x + (W b_p + b).
        W has feature_dim < head_dim rows per head, so the fused matmul does less work than the
        projections alone. Folded in at least float32, so half-precision weights lose nothing more."""
        dtype = proj.weight.dtype
        acc = torch.promote_types(dtype, torch.float32)
        fm_w, fm_b = self.feature_map.weight.to(acc), self.feature_map.bias.to(acc)
        w = proj.weight.to(acc).view(self.num_heads, self.head_dim, -1)  # (heads, head_dim, embed)
        b = proj.bias.to(acc).view(self.num_heads, self.head_dim)
        return (torch.einsum("hfd,hde->hfe", fm_w, w).flatten(0, 1).to(dtype),
                (torch.einsum("hfd,hd->hf", fm_w, b) + fm_b).flatten().to(dtype))


class T2RCrossAttention(_LinearAttention):
    """Encoder-decoder attention: every target position reads one state over the whole source,
    [S | z] = phi(k)^T [v | 1], in which padded source positions are zero. While decoding it is
    computed at the first step and then read from incremental_state."""

    def __init__(self, embed_dim: int, num_heads: int, *, kdim: Optional[int] = None, vdim: Optional[int] = None,
                 feature_map: str = "t2r", feature_dim: int = 32):
        super().__init__(embed_dim, num_heads, feature_map=feature_map, feature_dim=feature_dim, kdim=kdim, vdim=vdim)

    def forward(self, query: Tensor, key: Optional[Tensor], value: Optional[Tensor],
                key_padding_mask: Optional[Tensor] = None, incremental_state: IncrementalState = None,
                need_weights: bool = True, static_kv: bool = False, attn_mask: Optional[Tensor] = None,
                before_softmax: bool = False, need_head_weights: bool = False) -> Tuple[Tensor, None]:
        """query: (time, batch, embed); key/value: (src_time, batch, kdim/vdim), the encoder output."""
        state = self._saved_state(incremental_state)
        if state is None:
            k = self._drop_padding(self._features(self.k_proj, key), key_padding_mask)
            v1 = self._heads(nn.functional.linear(value, *self._value_weights()))
            state = packed_linear_attention_state(k, v1)
            if incremental_state is not None:
                self._save_state(incremental_state, state)
        return self._merge(packed_linear_attention_read(self._features(self.q_proj, query), state)), None

    @torch.jit.unused
    def reorder_incremental_state(self, incremental_state: IncrementalState, new_order: Tensor):
        """The state is made from the encoder output, the same for every beam of one sentence, and
        beam search moves hypotheses only among the beams of their sentence: while the batch keeps its
        size, reordering changes no value, and is skipped (fairseq's MultiheadAttention skips its static
        encoder-decoder buffers so). A batch that shrank (finished sentences dropped) is selected."""
        state = self._saved_state(incremental_state)
        if state is not None and state.size(0) != new_order.size(0):
            self._save_state(incremental_state, state.index_select(0, new_order))
        return incremental_state


def prefill(decoder, tokens: Tensor, incremental_state: Dict, **kwargs):
    """decoder(tokens, **kwargs) in one parallel pass during which every T2R self-attention makes
    the multi-token incremental call: it continues from its state in incremental_state and leaves
    its final state there (a prompt read at once, or one block of a stream after another).

    fairseq's decoder cannot make that call itself: given an incremental_state it reads only the
    last token. So the state is passed to the modules directly, and everything else is a plain
    forward over `tokens`: positions start at 0, and softmax layers of a hybrid keep no state."""
    def pass_state(module, args, module_kwargs):
        return args, {**module_kwargs, "incremental_state": incremental_state}

    modules = [getattr(layer, "module", layer).self_attn for layer in decoder.layers]  # unwraps checkpoint/FSDP
    hooks = [m.register_forward_pre_hook(pass_state, with_kwargs=True)
             for m in modules if isinstance(m, T2RSelfAttention)]
    try:
        return decoder(tokens, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
