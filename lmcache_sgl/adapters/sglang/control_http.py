"""The control API on a running SGLang server: ``/lmcache/*`` routes answered by the scheduler processes.

Routes (JSON out; a bad request is a 400 with ``{"error": reason}``):

    POST /lmcache/lookup   {"tokens": [ids]} or {"text": "..."}   cached tokens per tier
    POST /lmcache/pin      same body    save the device's full chunks of the prefix to the store, pin them
    POST /lmcache/unpin    same body
    POST /lmcache/clear    {"tier": "host"|"disk"|"remote"|null, "model": name|null}
    GET  /lmcache/health, /lmcache/stats

Channel: SGLang's own ``GetInternalStateReq``, which ``/server_info`` sends
from the TokenizerManager to the schedulers over their ZMQ socket (one reply
per DP rank). Ours carries its operation in the request's ``rid``
(``lmcache_sgl.control:`` + JSON); an AROUND hook on
``Scheduler.get_internal_state`` answers it from the tree's store and leaves
every other request to SGLang. TP rank 0 broadcasts each control request to
its peers, so every TP rank runs the hook: the answers are gathered over the
TP CPU group (a collective: each rank reaches it once per request, also on an
error) and combined. lookup, pin and unpin report the MIN over ranks (what
every rank holds), clear sums, health is ok only when every rank is; each
answer lists the ranks' own results under ``ranks``.

Pins live in the scheduler processes' memory: a restart forgets them.
"""

from __future__ import annotations

import json
import logging
from array import array
from dataclasses import asdict

import torch.distributed as dist

from ...control import CacheControl, LookupReport, as_json, min_lookup, parse_tier, token_ids

log = logging.getLogger(__name__)

RID_PREFIX = "lmcache_sgl.control:"
ROUTE_PREFIX = "/lmcache"
_TOKEN_OPS = ("lookup", "pin", "unpin")
_ADMIN_OPS = ("pin", "unpin", "clear")  # change the cache: admin key when SGLang has one
_FIELDS = {"lookup": {"tokens", "text"}, "pin": {"tokens", "text"}, "unpin": {"tokens", "text"},
           "clear": {"tier", "model"}, "health": set(), "stats": set()}


# ---- scheduler side ----------------------------------------------------------

def around_get_internal_state(original, scheduler, recv_req, *args, **kwargs):
    """Answer our control requests; pass every other ``GetInternalStateReq`` to SGLang."""
    rid = getattr(recv_req, "rid", None)
    if not (isinstance(rid, str) and rid.startswith(RID_PREFIX)):
        return original(scheduler, recv_req, *args, **kwargs)
    from sglang.srt.managers.io_struct import GetInternalStateReqOutput

    return GetInternalStateReqOutput(internal_state={"lmcache_sgl": answer(scheduler, rid[len(RID_PREFIX):])})


def answer(scheduler, payload: str) -> dict:
    """``{"status": 200, "result": ...}`` or ``{"status": 4xx/5xx, "error": reason}``, combined over TP ranks."""
    from .plugin import _is_ours

    tree = getattr(scheduler, "tree_cache", None)
    if not _is_ours(tree):
        return {"status": 503, "error": "this server's radix cache is not lmcache_sgl's (start with --enable-lmcache)"}
    op = None
    try:
        request = json.loads(payload)
        op = request.get("op") if isinstance(request, dict) else None
        local = {"result": run_local(tree, request)}
    except ValueError as e:
        local = {"status": 400, "error": str(e)}
    except Exception as e:  # noqa: BLE001 - engine boundary: an error answer, never a dead scheduler
        log.exception("lmcache_sgl: control request %s failed", op)
        local = {"status": 500, "error": f"{type(e).__name__}: {e}"}
    ranks = gather(tree.link.agree.groups, local)  # collective: reached on every path
    failed = next((r for r in ranks if "error" in r), None)
    if failed is not None:
        return failed
    return {"status": 200, "result": combine(op, [r["result"] for r in ranks])}


def run_local(tree, request) -> dict:
    """This rank's answer to one control request (JSON-ready). ValueError: a bad request."""
    if not isinstance(request, dict) or request.get("op") not in _FIELDS:
        raise ValueError(f"op={request.get('op') if isinstance(request, dict) else request!r} is invalid; "
                         f"allowed: {', '.join(_FIELDS)}")
    op, ctl = request["op"], CacheControl(tree.link.store)
    if op in _TOKEN_OPS:
        tokens = token_ids(request.get("tokens"))
        if op == "lookup":
            return as_json(ctl.lookup(tokens, device_tokens=device_match(tree, tokens)[0]))
        if op == "pin":
            save_device_prefix(tree, tokens)
            return as_json(ctl.pin(tokens))
        return as_json(ctl.unpin(tokens))
    if op == "clear":
        return as_json(ctl.clear(request.get("tier"), request.get("model")))
    if op == "health":
        return as_json(ctl.health())
    return {**as_json(ctl.stats()), "link": asdict(tree.link.counters)}


def device_match(tree, tokens: list[int]):
    """(tokens of the prompt on the device, their device slots [n] or None); no request, no lock held."""
    from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    result = tree.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens))))
    n = result.device_prefix_len
    return n, (tree.path_device_indices(result.last_device_node)[:n] if n else None)


def save_device_prefix(tree, tokens: list[int]) -> int:
    """Put the full chunks of the prompt's device match into the store, so a pin can hold them."""
    from .tier_link import token_array

    n, slots = device_match(tree, tokens)
    if n < tree.link.chunk_size:
        return 0
    return tree.link.save_completed_chunks(token_array(tokens[:n]), slots, node_start=0)


def gather(groups, value) -> list:
    """Every rank's ``value`` (all ranks of ``groups``); a collective unless single-rank."""
    values = [value]
    for group in groups:
        out = [None] * dist.get_world_size(group=group)
        dist.all_gather_object(out, values, group=group)
        values = [v for part in out for v in part]
    return values


def combine(op: str, results: list[dict]) -> dict:
    """One answer from the TP ranks' results, which it lists under ``ranks``."""
    if op == "lookup":
        summary = min_lookup([LookupReport(**r) for r in results])._asdict()
    elif op in ("pin", "unpin"):
        summary = {k: min(r[k] for r in results) for k in results[0]}
    elif op == "clear":
        summary = {k: sum(r[k] for r in results) for k in ("host_removed", "disk_removed", "pinned_kept")}
        summary.update(tiers=results[0]["tiers"], model=results[0]["model"])
    elif op == "health":
        summary = {"ok": all(r["ok"] for r in results)}
    else:
        summary = {}
    return {**summary, "ranks": results}


# ---- HTTP side (the server process) -------------------------------------------

def install_routes() -> None:
    """Add the ``/lmcache/*`` routes to SGLang's FastAPI app (idempotent)."""
    from sglang.srt.entrypoints import http_server
    from sglang.srt.utils.auth import AuthLevel, auth_level

    app = http_server.app
    if any(getattr(r, "path", None) == f"{ROUTE_PREFIX}/health" for r in app.routes):
        return
    for op in _FIELDS:
        endpoint = _endpoint(op)
        if op in _ADMIN_OPS:
            endpoint = auth_level(AuthLevel.ADMIN_OPTIONAL)(endpoint)
        app.add_api_route(f"{ROUTE_PREFIX}/{op}", endpoint, methods=["GET"] if op in ("health", "stats") else ["POST"])


def _endpoint(op: str):
    from fastapi import Request

    async def endpoint(request: Request):
        from fastapi.responses import JSONResponse

        try:
            payload = await _payload(op, request)
        except ValueError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        status, body = await _ask(payload)
        return JSONResponse(body, status_code=status)

    endpoint.__name__ = f"lmcache_{op}"
    endpoint.__annotations__["request"] = Request  # a class, not the string this module's annotations are
    return endpoint


async def _payload(op: str, request) -> dict:
    """The validated request for the schedulers. ValueError: a 400 with its message."""
    if not _FIELDS[op]:
        return {"op": op}
    try:
        body = await request.json()
    except ValueError:  # also a body that is not UTF-8
        raise ValueError("the body is not JSON; send a JSON object") from None
    if not isinstance(body, dict):
        raise ValueError(f"the body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - _FIELDS[op])
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; allowed for {op}: {sorted(_FIELDS[op])}")
    if op == "clear":
        parse_tier(body.get("tier"))
        model = body.get("model")
        if model is not None and (not isinstance(model, str) or not model):
            raise ValueError(f"model={model!r} is invalid; allowed: a model_name, or its part before '@'")
        return {"op": op, "tier": body.get("tier"), "model": model}
    return {"op": op, "tokens": _tokens(body)}


def _tokens(body: dict) -> list[int]:
    if ("tokens" in body) == ("text" in body):
        raise ValueError("send exactly one of 'tokens' (a list of token ids) or 'text' (a string)")
    if "tokens" in body:
        if not isinstance(body["tokens"], list):
            raise ValueError(f"tokens must be a list of token ids, got {type(body['tokens']).__name__}")
        return token_ids(body["tokens"])
    if not isinstance(body["text"], str):
        raise ValueError(f"text must be a string, got {type(body['text']).__name__}")
    tokenizer = _tokenizer_manager().tokenizer
    if tokenizer is None:
        raise ValueError("this server has no tokenizer (--skip-tokenizer-init); send 'tokens'")
    return token_ids(body["text"], tokenizer)


def _tokenizer_manager():
    from sglang.srt.entrypoints import http_server

    return http_server.get_global_state().tokenizer_manager


async def _ask(payload: dict) -> tuple[int, dict]:
    """(HTTP status, body): the schedulers' answer; one result, or ``dp_ranks`` with one per DP rank."""
    from sglang.srt.managers.io_struct import GetInternalStateReq

    manager = _tokenizer_manager()
    manager.auto_create_handle_loop()
    replies = await manager.get_internal_state_communicator(GetInternalStateReq(rid=RID_PREFIX + json.dumps(payload)))
    answers = [r.internal_state.get("lmcache_sgl") for r in replies]
    if not answers or any(a is None for a in answers):
        return 503, {"error": "the scheduler did not answer the control request (is --enable-lmcache on?)"}
    failed = next((a for a in answers if a["status"] != 200), None)
    if failed is not None:
        return failed["status"], {"error": failed["error"]}
    results = [a["result"] for a in answers]
    return 200, results[0] if len(results) == 1 else {"dp_ranks": results}
