"""Drop-in replacement for fairseq's MultiheadAttention: T2R linear attention.

Same constructor shape (embed_dim, num_heads, kdim/vdim), same parameter names (q_proj, k_proj,
v_proj, out_proj: a softmax checkpoint loads by name), same forward contract on
(time, batch, channel) tensors returning (out, None).

Two roles:
- causal self-attention (decoder): decode state is (S, z) per layer, packed as one tensor
  [S | z] of (batch, heads, features, head_dim + 1), batch-first, constant size;
- cross-attention (encoder-decoder): the state over the whole source is computed once per
  sentence and cached; padded source positions are zeroed in phi(k) and contribute nothing.
"""
from typing import Dict, Optional, Tuple

import torch
from fairseq.incremental_decoding_utils import with_incremental_state
from torch import Tensor, nn

from .feature_maps import T2RFeatureMap, build_feature_map
from .linear_attention import (DEFAULT_CHUNK_SIZE, accumulation_dtype, causal_linear_attention, linear_attention_read,
                               linear_attention_state, pack_state, packed_linear_attention_step, unpack_state)


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
        # Fold the T2R feature map into q/k/v_proj (one matmul, see _fused_projection); False runs
        # the textbook form (projections, then feature map), which tests compare against.
        self.fold_feature_map = True
        # Stream scoring (score_stream.py): the parallel form starts from the state the previous
        # block left and keeps its own final state, so context is unbounded at constant cost.
        self.carry_state = False
        self.carried_state = None
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
        if self._folds(query, key, value):
            q, k, v = self._fused_qkv(query, key_padding_mask, incremental_state)
        else:
            q = self.feature_map(self._heads(self.q_proj(query)))
            if self.cross_attention:
                return self._merge(linear_attention_read(q, self._source_state(key, value, key_padding_mask,
                                                                                incremental_state))), None
            k = self._keys(query if key is None else key, key_padding_mask)
            v = self._heads(self.v_proj(query if value is None else value))
        if incremental_state is None:
            out, final = causal_linear_attention(q, k, v, chunk_size=self.chunk_size,
                                                 initial_state=self.carried_state if self.carry_state else None)
            if self.carry_state:
                self.carried_state = (final[0].detach(), final[1].detach())
            return self._merge(out), None
        # Decoding keeps the packed state [S | z] (see packed_linear_attention_step), which needs
        # v1 = [v | 1]: the fused projection emits the ones column, other paths append it.
        if v.size(-1) == self.head_dim:
            v = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)
        saved = self._get_input_buffer(incremental_state).get("Sz")
        if q.size(2) == 1:
            old = saved if saved is not None else q.new_zeros(*q.shape[:2], q.size(-1), v.size(-1),
                                                                dtype=accumulation_dtype(q))
            # No autograd during generation: update the cached state in place, no allocation.
            out, state = packed_linear_attention_step(q, k, v, old, inplace=not torch.is_grad_enabled())
        else:
            out, final = causal_linear_attention(q, k, v[..., :-1], chunk_size=self.chunk_size,
                                                 initial_state=None if saved is None else unpack_state(saved))
            state = pack_state(final)
        if state is not saved:
            self._set_input_buffer(incremental_state, {"Sz": state})
        return self._merge(out), None

    # -- T2R self-attention: feature map folded into the projections, q/k/v in one matmul ----
    def _folds(self, query: Tensor, key: Optional[Tensor], value: Optional[Tensor]) -> bool:
        # Only the T2R map: its first layer is linear and so folds into q_proj/k_proj. Only
        # self-attention: q, k and v must come from the same input to share one matmul.
        return (self.fold_feature_map and not self.cross_attention and isinstance(self.feature_map, T2RFeatureMap)
                and (key is None or key is query) and (value is None or value is query))

    def _fused_projection(self, incremental_state) -> Tuple[Tensor, Tensor]:
        """(weight, bias) with x @ weight.T + bias = [W q(x) + b | W k(x) + b | v(x)] per head:
        the map phi(y) = relu(W y + b) folds into a projection as
        W (W_q x + b_q) + b = (W W_q) x + (W b_q + b), and W has feature_dim < head_dim rows per
        head, so the fused matmul does less work than q_proj and k_proj alone.

        With autograd on it is folded on every call, so gradients reach W, W_q and W_k exactly as
        in the unfused form. Without autograd, decoding folds once per run and keeps the result in
        that run's incremental_state: weights cannot change in the middle of a generation, and a
        new generation (a new incremental_state) folds the current weights, so no cache can go
        stale (fairseq's optimizers update .data, which no version counter sees)."""
        if incremental_state is None or torch.is_grad_enabled():
            return self._fold(ones_column=incremental_state is not None)
        fused = self.get_incremental_state(incremental_state, "t2r_fused")
        if fused is None:
            weight, bias = self._fold(ones_column=True)
            fused = {"weight": weight, "bias": bias}
            self.set_incremental_state(incremental_state, "t2r_fused", fused)
        return fused["weight"], fused["bias"]

    def _fold(self, ones_column: bool) -> Tuple[Tensor, Tensor]:
        dtype = self.v_proj.weight.dtype
        acc = torch.promote_types(dtype, torch.float32)  # fold half-precision weights in float32
        fm_w, fm_b = self.feature_map.weight.to(acc), self.feature_map.bias.to(acc)

        def fold(proj: nn.Linear):
            w = proj.weight.to(acc).view(self.num_heads, self.head_dim, -1)  # (heads, head_dim, embed)
            b = proj.bias.to(acc).view(self.num_heads, self.head_dim)
            return (torch.einsum("hfd,hde->hfe", fm_w, w).flatten(0, 1),
                    (torch.einsum("hfd,hd->hf", fm_w, b) + fm_b).flatten())

        (wq, bq), (wk, bk) = fold(self.q_proj), fold(self.k_proj)
        wv, bv = self.v_proj.weight, self.v_proj.bias
        if ones_column:
            # One more output per head that is always 1 (zero weights, bias 1): v1 = [v | 1].
            wv = wv.view(self.num_heads, self.head_dim, -1)
            wv = torch.cat([wv, wv.new_zeros(self.num_heads, 1, wv.size(-1))], dim=1).flatten(0, 1)
            bv = bv.view(self.num_heads, self.head_dim)
            bv = torch.cat([bv, bv.new_ones(self.num_heads, 1)], dim=1).flatten()
        return torch.cat([wq.to(dtype), wk.to(dtype), wv]), torch.cat([bq.to(dtype), bk.to(dtype), bv])

    def _fused_qkv(self, query: Tensor, key_padding_mask: Optional[Tensor],
                   incremental_state) -> Tuple[Tensor, Tensor, Tensor]:
        """phi(q), phi(k), v from one matmul, each (batch, heads, time, .) like the unfused path;
        when decoding, v carries the ones column: (batch, heads, time, head_dim + 1)."""
        weight, bias = self._fused_projection(incremental_state)
        qkv = nn.functional.linear(query, weight, bias)
        n_feat = self.num_heads * self.feature_map.feature_dim
        torch.relu_(qkv[..., :2 * n_feat])
        q, k, v = (self._heads(t) for t in qkv.split([n_feat, n_feat, qkv.size(-1) - 2 * n_feat], dim=-1))
        if key_padding_mask is not None:
            k = k.masked_fill(key_padding_mask.bool()[:, None, :, None], 0.0)
        return q, k, v

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
