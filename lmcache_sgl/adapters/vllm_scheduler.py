"""Scheduler side of the vLLM connector: lookups, per-request state, step metadata.

The scheduler holds no store. It asks the workers (over ``LookupClient``) how
many leading tokens of a prompt their stores hold, and plans per step which
token ranges each worker loads into, or saves out of, vLLM's blocks.

Index ranges of a request's prompt of n tokens (chunk size C, block size B):
  # [0, local)          vLLM's own prefix-cache hit, block aligned
  # [local, hit')       loaded from the store this step; hit' = min(hit, num_tokens - 1)
  # [hit', n)           computed by vLLM
  # [0, saved)          in the store, or already handed to the workers to save
  # [0, computed)       in vLLM's blocks after the last planned step
A request that comes back with fewer computed tokens than planned was rolled
back by vLLM (its load failed, or it shared blocks whose load failed; the
workers then skipped saves over those blocks), so ``saved`` falls back to the
chunk boundary at or below the rolled-back point and the recompute saves again.
Chunk i covers [i*C, (i+1)*C); a partial last chunk [k*C, n) exists only with
``save_unfull_chunk``. A token t lives in slot ``block_ids[t // B] * B + t % B``.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from multiprocessing.connection import Client, Connection

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from ..keys import token_bytes

log = logging.getLogger(__name__)

LOOKUP_TIMEOUT_S = 5.0  # a worker slower than this to answer is taken as a miss


@dataclass
class TransferSpec:
    """Move tokens [start, end) of one request between vLLM's blocks and the store."""

    req_id: str
    token_ids: list[int]  # prompt tokens [0, chunk end covering `end`): the keys chain from token 0
    start: int
    end: int
    block_ids: list[int]  # the request's blocks covering [0, end)


@dataclass
class LMCacheSGLMetadata(KVConnectorMetadata):
    loads: list[TransferSpec] = field(default_factory=list)  # store -> blocks, before the forward
    saves: list[TransferSpec] = field(default_factory=list)  # blocks -> store, after the forward
    num_scheduled_tokens: int = 0  # tokens the step's forward computes (times the prefill rate)


class LookupClient:
    """Asks each TP rank's ``LookupServer`` how many prompt tokens it holds; the minimum wins.

    Any failure (no server yet, a timeout, a closed socket) is a logged miss.
    """

    def __init__(self, addresses: list[str], authkey: bytes) -> None:
        self._addresses = addresses
        self._authkey = authkey
        self._conns: list[Connection | None] = [None] * len(addresses)
        self._lock = threading.Lock()
        self._failing = False

    def lookup(self, token_ids: list[int]) -> int:
        payload = token_bytes(token_ids)
        with self._lock:
            try:
                hits = [self._ask(rank, payload) for rank in range(len(self._addresses))]
            except (OSError, EOFError, TimeoutError, ValueError) as e:
                self._drop_all()
                if not self._failing:
                    log.warning("lmcache_sgl: store lookup failed (%s); treating it as a miss", e)
                self._failing = True
                return 0
        self._failing = False
        return min(hits)

    def _ask(self, rank: int, payload: bytes) -> int:
        conn = self._conns[rank]
        if conn is None:
            conn = self._conns[rank] = Client(self._addresses[rank], family="AF_UNIX", authkey=self._authkey)
        conn.send_bytes(payload)
        if not conn.poll(LOOKUP_TIMEOUT_S):
            raise TimeoutError(f"rank {rank} did not answer within {LOOKUP_TIMEOUT_S} s")
        return int(conn.recv())

    def _drop_all(self) -> None:
        for i, conn in enumerate(self._conns):
            if conn is not None:
                conn.close()
            self._conns[i] = None

    def close(self) -> None:
        with self._lock:
            self._drop_all()


class _ReqState:
    __slots__ = ("token_ids", "block_ids", "saved", "computed", "load")

    def __init__(self, token_ids: list[int]) -> None:
        self.token_ids = token_ids  # the prompt
        self.block_ids: list[int] = []
        self.saved = 0  # tokens [0, saved) are in the store or queued for saving
        self.computed = 0  # tokens [0, computed) are in vLLM's blocks once the last planned step ran
        self.load: tuple[int, int] | None = None  # [start, end) to load in the next step


class SchedulerSide:
    """Per-request bookkeeping between vLLM's scheduler callbacks."""

    def __init__(self, lookup: LookupClient, chunk_size: int, block_size: int, save_unfull_chunk: bool,
                 can_load: bool, can_save: bool) -> None:
        self._lookup = lookup
        self._chunk = chunk_size
        self._block = block_size
        self._unfull = save_unfull_chunk
        self._can_load = can_load
        self._can_save = can_save
        self._hits: dict[str, tuple[int, int]] = {}  # req_id -> (local hit, store hit), until allocation
        self._reqs: dict[str, _ReqState] = {}

    # ---- vLLM callbacks ------------------------------------------------------

    def num_new_matched_tokens(self, request, num_computed_tokens: int) -> int:
        """Tokens the store holds beyond vLLM's local hit; one fewer when the whole prompt hits."""
        tokens = cacheable_prompt(request)
        if tokens is None or not (self._can_load or self._can_save):
            return 0
        hit = self._lookup.lookup(tokens)  # a producer looks up too, to skip saving what is stored
        # Recorded here: request.num_computed_tokens is not updated yet in update_state_after_alloc.
        self._hits[request.request_id] = (num_computed_tokens, hit)
        if not self._can_load:
            return 0
        usable = min(hit, request.num_tokens - 1)  # vLLM must compute at least one token
        return max(0, usable - num_computed_tokens)

    def after_alloc(self, request, num_external_tokens: int) -> None:
        local, hit = self._hits.pop(request.request_id, (0, 0))
        tokens = cacheable_prompt(request)
        if tokens is None:
            return
        state = self._reqs.get(request.request_id)
        if state is None:
            state = self._reqs[request.request_id] = _ReqState(tokens)
        state.saved = max(state.saved, hit)  # chunks the store holds need no save
        state.computed = 0  # new or resumed after preemption: vLLM counts its tokens afresh
        state.load = (local, local + num_external_tokens) if num_external_tokens > 0 else None

    def build_meta(self, scheduler_output) -> LMCacheSGLMetadata:
        meta = LMCacheSGLMetadata(num_scheduled_tokens=scheduler_output.total_num_scheduled_tokens)
        for new in scheduler_output.scheduled_new_reqs:
            state = self._reqs.get(new.req_id)
            if state is None:
                continue
            state.block_ids = list(new.block_ids[0])
            self._plan(new.req_id, state, new.num_computed_tokens, scheduler_output, meta)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self._reqs.get(req_id)
            if state is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:  # after preemption: the full block list
                state.block_ids = list(new_blocks[0]) if new_blocks else []
            elif new_blocks:
                state.block_ids.extend(new_blocks[0])
            self._plan(req_id, state, cached.num_computed_tokens[i], scheduler_output, meta)
        return meta

    def finished(self, request) -> None:
        self._hits.pop(request.request_id, None)
        self._reqs.pop(request.request_id, None)

    # ---- planning ------------------------------------------------------------

    def _plan(self, req_id: str, state: _ReqState, num_computed: int, scheduler_output,
              meta: LMCacheSGLMetadata) -> None:
        if state.load is not None:
            start, end = state.load
            meta.loads.append(self._spec(req_id, state, start, end))
            state.load = None
        if not self._can_save:
            return
        n = len(state.token_ids)
        if min(num_computed, n) < state.computed:  # rolled back by vLLM: save the recomputed chunks again
            state.saved = min(state.saved, num_computed - num_computed % self._chunk)
        # After this step's forward, tokens [0, num_computed + scheduled) sit in the blocks.
        done = min(num_computed + scheduler_output.num_scheduled_tokens.get(req_id, 0), n)
        state.computed = done
        end = done if (done == n and self._unfull) else done - done % self._chunk
        if end > state.saved:
            meta.saves.append(self._spec(req_id, state, state.saved, end))
            state.saved = end

    def _spec(self, req_id: str, state: _ReqState, start: int, end: int) -> TransferSpec:
        chunk_end = min(-(-end // self._chunk) * self._chunk, len(state.token_ids))
        num_blocks = -(-end // self._block)
        return TransferSpec(req_id, state.token_ids[:chunk_end], start, end, state.block_ids[:num_blocks])


def cacheable_prompt(request) -> list[int] | None:
    """The prompt's token ids, or None when token ids alone do not determine its KV.

    Multimodal placeholders, LoRA adapters, prompt embeddings and cache salts
    change the KV of the same token ids, so those requests bypass the store.
    """
    tokens = request.prompt_token_ids
    if (tokens is None or getattr(request, "mm_features", None) or getattr(request, "lora_request", None)
            or getattr(request, "cache_salt", None) or getattr(request, "prompt_embeds", None) is not None):
        return None
    return list(tokens)
