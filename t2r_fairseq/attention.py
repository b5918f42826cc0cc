"""Drop-in replacement for fairseq's MultiheadAttention: T2R linear attention.

Same constructor shape (embed_dim, num_heads, kdim/vdim), same parameter names (q_proj, k_proj,
v_proj, out_proj: a softmax checkpoint loads by name), same forward contract on
(time, batch, channel) tensors returning (out, None).

Two roles:
- causal self-attention (decoder): decode state is (S, z) per layer, batch-first, constant size;
- cross-attention (encoder-decoder): the state over the whole source is computed once per
  sentence and cached; padded source positions are zeroed in phi(k) and contribute nothing.
"""
from typing import Dict, Optional, Tuple

import torch
from fairseq.incremental_decoding_utils import with_incremental_state
from torch import Tensor, nn

from .feature_maps import build_feature_map
from .linear_attention import (DEFAULT_CHUNK_SIZE, causal_linear_attention, linear_attention_read,
                               linear_attention_state, linear_attention_step)


@with_incremental_state
class T2RAttention(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int, *, feature_map: str = "t2r", feature_dim: int = 32,
                 kdim: Optional[int] = None, vdim: Optional[int] = None, cross_attention: bool = False,
                 chunk_size: int = DEFAULT_CHUNK_SIZE):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.cross_attention = cross_attention
        self.chunk_size = chunk_size
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
        """(time, batch, embed) -> (batch, heads, time, head_dim)"""
        time, batch, _ = x.shape
        return x.view(time, batch, self.num_heads, self.head_dim).permute(1, 2, 0, 3)

    def _merge(self, x: Tensor) -> Tensor:
        """(batch, heads, time, head_dim) -> (time, batch, embed), then the output projection."""
        batch, _, time, _ = x.shape
        return self.out_proj(x.permute(2, 0, 1, 3).reshape(time, batch, self.embed_dim))

    def _keys(self, key: Tensor, key_padding_mask: Optional[Tensor]) -> Tensor:
        k = self.feature_map(self._heads(self.k_proj(key)))
        if key_padding_mask is not None:
            k = k.masked_fill(key_padding_mask.bool()[:, None, :, None], 0.0)
        return k

    # -- forward ----------------------------------------------------------------------------
    def forward(self, query: Tensor, key: Optional[Tensor], value: Optional[Tensor],
                key_padding_mask: Optional[Tensor] = None,
                incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None,
                need_weights: bool = True, static_kv: bool = False, attn_mask: Optional[Tensor] = None,
                before_softmax: bool = False, need_head_weights: bool = False) -> Tuple[Tensor, None]:
        """query: (time, batch, embed); key/value: (src_time, batch, kdim) for cross-attention.
        attn_mask is ignored: self-attention is causal by construction. No attention weights exist
        to return, so the second output is always None."""
        q = self.feature_map(self._heads(self.q_proj(query)))
        if self.cross_attention:
            return self._merge(linear_attention_read(q, self._source_state(key, value, key_padding_mask,
                                                                            incremental_state))), None
        k = self._keys(query if key is None else key, key_padding_mask)
        v = self._heads(self.v_proj(query if value is None else value))
        if incremental_state is None:
            out, _ = causal_linear_attention(q, k, v, chunk_size=self.chunk_size)
            return self._merge(out), None
        saved = self._get_input_buffer(incremental_state)
        state = (saved["S"], saved["z"]) if "S" in saved else None
        if q.size(2) == 1:
            # No autograd during generation: update the cached state in place, no allocation.
            out, state = linear_attention_step(q, k, v, state, inplace=not torch.is_grad_enabled())
        else:
            out, state = causal_linear_attention(q, k, v, initial_state=state, chunk_size=self.chunk_size)
        self._set_input_buffer(incremental_state, {"S": state[0], "z": state[1]})
        return self._merge(out), None

    def _source_state(self, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor],
                      incremental_state) -> Tuple[Tensor, Tensor]:
        if incremental_state is not None:
            saved = self._get_input_buffer(incremental_state)
            if "S" in saved:
                return saved["S"], saved["z"]
        state = linear_attention_state(self._keys(key, key_padding_mask), self._heads(self.v_proj(value)))
        if incremental_state is not None:
            self._set_input_buffer(incremental_state, {"S": state[0], "z": state[1]})
        return state

    # -- fairseq incremental-state protocol -------------------------------------------------
    def _get_input_buffer(self, incremental_state) -> Dict[str, Optional[Tensor]]:
        result = self.get_incremental_state(incremental_state, "t2r_state")
        return {} if result is None else result

    def _set_input_buffer(self, incremental_state, buffer: Dict[str, Optional[Tensor]]):
        return self.set_incremental_state(incremental_state, "t2r_state", buffer)

    @torch.jit.unused
    def reorder_incremental_state(self, incremental_state, new_order: Tensor):
        """Beam search: state is batch-first, so reordering is one index_select per tensor."""
        saved = self._get_input_buffer(incremental_state)
        if saved:
            self._set_input_buffer(incremental_state, {name: t.index_select(0, new_order)
                                                       for name, t in saved.items()})
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
