"""SGLang's Llama decoder stack and KV pool as the blend loop's ``BlendLayers``.

One object serves one extend batch. Its rows are the batch's extend tokens back
to back (``forward_batch.input_ids`` order); request ``r`` owns rows

  # [row_start[r], row_start[r] + extend_len[r])   its positions prefix_len[r] .. seq_len[r] - 1

and its cache is ``req_to_token[pool_row[r], :seq_len[r]]``: the prefix slots
(already filled by the tree or a store load) followed by the extend slots
(``out_cache_loc`` rows). The pieces called are the layer's own modules
(``input_layernorm``, ``qkv_proj`` + ``rotary_emb``, ``o_proj``,
``post_attention_layernorm``, ``mlp``), so every computed row is the model's
exact arithmetic; only attention is ours (a mask by position over the slots),
because SGLang's backends take queries as a contiguous suffix.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.nn.functional import scaled_dot_product_attention

from .cpu_shims import _attend_suffix


class BatchRows(NamedTuple):
    """Where each request of an extend batch sits (all lists are per request, in batch order)."""

    rids: list[str]
    row_start: list[int]  # first batch row of the request's extend
    prefix_len: list[int]  # cached positions before the extend
    extend_len: list[int]
    pool_row: list[int]  # req_to_token row

    @classmethod
    def of(cls, forward_batch) -> "BatchRows":
        prefix = [int(x) for x in forward_batch.extend_prefix_lens_cpu]
        extend = [int(x) for x in forward_batch.extend_seq_lens_cpu]
        starts, at = [], 0
        for n in extend:
            starts.append(at)
            at += n
        pool = forward_batch.req_pool_indices.tolist()
        return cls(list(forward_batch.rids), starts, prefix, extend, [int(p) for p in pool])

    def request_of_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """[n] request index of each batch row."""
        ends = torch.tensor([s + n for s, n in zip(self.row_start, self.extend_len)], device=rows.device)
        return torch.bucketize(rows, ends, right=True)


class SGLangBlendLayers:
    """``BlendLayers`` over a ``LlamaModel``'s decoder layers and SGLang's MHA pool, for one batch."""

    def __init__(self, model, forward_batch, kv_pool, req_to_token: torch.Tensor, batch: BatchRows) -> None:
        self.layers = model.layers
        self.num_layers = len(model.layers)
        self.forward_batch = forward_batch
        self.pool = kv_pool
        self.req_to_token = req_to_token
        self.batch = batch
        self._write_loc = forward_batch.out_cache_loc  # [N] slot of each batch row
        self._physical = bool(getattr(forward_batch, "out_cache_loc_is_physical", False))

    def qkv(self, layer, hidden, residual, positions):
        decoder = self.layers[layer]
        if residual is None:
            residual, normed = hidden, decoder.input_layernorm(hidden)
        else:
            normed, residual = decoder.input_layernorm(hidden, residual)
        attn = decoder.self_attn
        q, k, v = attn.forward_prepare_native(positions=positions, hidden_states=normed)
        shape = (-1, attn.num_kv_heads, attn.head_dim)
        return q, k.reshape(shape), v.reshape(shape), residual

    def write_kv(self, layer, rows, k, v):
        from sglang.srt.mem_cache.memory_pool import KVWriteLoc

        loc = KVWriteLoc(self._write_loc[rows.to(self._write_loc.device)], physical=self._physical)
        self.pool.set_kv_buffer(self.layers[layer].self_attn.attn, loc, k.contiguous(), v.contiguous())

    def attend(self, layer, q, q_rows):
        attn = self.layers[layer].self_attn.attn
        q = q.reshape(-1, attn.tp_q_head_num, attn.qk_head_dim)  # [n, Hq, D]
        out = torch.empty(q.shape[0], attn.tp_q_head_num, attn.v_head_dim, dtype=q.dtype, device=q.device)
        k_cache, v_cache = self.pool.get_key_buffer(attn.layer_id), self.pool.get_value_buffer(attn.layer_id)
        owner = self.batch.request_of_rows(q_rows)
        for r in torch.unique(owner).tolist():
            mine = (owner == r).nonzero().flatten()
            local = q_rows[mine] - self.batch.row_start[r]  # rows within the request's extend
            out[mine] = self._attend_request(r, q[mine], local, k_cache, v_cache, attn)
        return out.reshape(q.shape[0], -1)

    def _attend_request(self, r, q, local, k_cache, v_cache, attn):
        """q [m, Hq, D] of extend rows ``local`` [m] (ascending) over the request's slots [0, seq_len)."""
        prefix, n = self.batch.prefix_len[r], self.batch.extend_len[r]
        slots = self.req_to_token[self.batch.pool_row[r], :prefix + n].long()
        k, v = k_cache[slots].movedim(0, 1), v_cache[slots].movedim(0, 1)  # [Hkv, S, D]
        gqa = attn.tp_q_head_num != attn.tp_k_head_num
        qh = q.movedim(0, 1)  # [Hq, m, D]
        if local.numel() == n:  # every extend row: the stock suffix attention, bit for bit on CPU
            return _attend_suffix(qh, k, v, attn.scaling, gqa).movedim(0, 1)
        if k.dtype != qh.dtype:
            k, v = k.to(qh.dtype), v.to(qh.dtype)
        q_pos = local.to(q.device) + prefix  # [m]
        mask = torch.arange(prefix + n, device=q.device)[None, :] <= q_pos[:, None]  # [m, S] keys at or before
        o = scaled_dot_product_attention(qh.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), attn_mask=mask,
                                         scale=attn.scaling, enable_gqa=gqa)
        return o.squeeze(0).movedim(0, 1)

    def post(self, layer, attn_out, residual):
        decoder = self.layers[layer]
        out, _ = decoder.self_attn.o_proj(attn_out)
        out, residual = decoder.post_attention_layernorm(out, residual)
        return decoder.mlp(out, forward_batch=self.forward_batch), residual
