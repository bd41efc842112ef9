"""``lmcache-sgl``: offline tools for a cache directory.

    lmcache-sgl stats DIR               entries, bytes, compression, models, age histograms
    lmcache-sgl inspect DIR KEY         one entry's header
    lmcache-sgl verify DIR              check every file; quarantine bad ones (exit 1 if any);
                                        warn about paths others can read
    lmcache-sgl prune DIR [--max-size 10GiB] [--older-than 7d] [--model NAME] [--dry-run]
    lmcache-sgl export DIR ARCHIVE.tar  /  import ARCHIVE.tar DIR
    lmcache-sgl prepopulate --model DIR --input prompts.jsonl --cache-dir DIR

Against a running SGLang server started with --enable-lmcache (its /lmcache/* routes):

    lmcache-sgl lookup --server URL (--text T | --tokens 1,2,3)   cached tokens per tier
    lmcache-sgl pin|unpin --server URL (--text T | --tokens 1,2,3)
    lmcache-sgl clear --server URL [--tier host|disk|remote] [--model NAME]
    lmcache-sgl health --server URL          (exit 1 when a tier is unhealthy)
    lmcache-sgl stats --server URL

Every subcommand prints JSON with ``--json`` and exits non-zero on failure.
``verify``, ``export`` and ``import`` take ``--shared-group`` (default: the
``LMCACHE_SHARED_DIR_GROUP`` variable, as the servers read it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import asdict, is_dataclass
from typing import Any, Iterable

from . import cache_admin
from .control import TIERS, ServerControl

_SIZE = re.compile(r"^\s*([0-9.]+)\s*([KMGT]?i?B?)\s*$", re.I)
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_DURATION = re.compile(r"^\s*([0-9.]+)\s*([smhdw])\s*$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_size(text: str) -> int:
    """'10GiB', '512M', '1.5G', '4096' -> bytes (binary units)."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"size {text!r} is not like 10GiB, 512M or 4096")
    return int(float(m.group(1)) * _UNITS[m.group(2)[:1].upper()])


def parse_duration(text: str) -> float:
    """'30s', '15m', '12h', '7d', '2w' -> seconds."""
    m = _DURATION.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"duration {text!r} is not like 30s, 15m, 12h, 7d or 2w")
    return float(m.group(1)) * _SECONDS[m.group(2)]


def _progress(enabled: bool, desc: str):
    def wrap(items: Iterable) -> Iterable:
        if not enabled:
            return items
        try:
            from tqdm import tqdm
        except ImportError:
            return items
        return tqdm(items, desc=desc, file=sys.stderr, leave=False)
    return wrap


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    if args.json:
        print(json.dumps(asdict(data) if is_dataclass(data) else data, default=str, indent=2))
    else:
        print(text)


def parse_tokens(text: str) -> list[int]:
    """'1,2,3' -> [1, 2, 3]."""
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"tokens {text!r} are not like 1,2,3") from None


def _server(args) -> ServerControl:
    return ServerControl(args.server, api_key=args.api_key)


def cmd_prompt_op(args) -> int:
    """lookup, pin, unpin: one prompt against a server."""
    if (args.tokens is None) == (args.text is None):
        raise ValueError(f"{args.command} needs exactly one of --tokens or --text")
    r = getattr(_server(args), args.command)(tokens=args.tokens, text=args.text)
    if "dp_ranks" in r:  # one answer per DP rank: shown as they are
        text = json.dumps(r, indent=2)
    elif args.command == "lookup":
        text = (f"{r['cached_tokens']} of {r['prompt_tokens']} tokens cached: device {r['device']}, "
                f"host {r['host']}, disk {r['disk']}, remote {r['remote']}")
    else:
        text = f"{args.command}ned {r['chunks']} chunks"
    _emit(args, r, text)
    return 0


def cmd_clear(args) -> int:
    r = _server(args).clear(args.tier, args.model)
    if "dp_ranks" in r:
        _emit(args, r, json.dumps(r, indent=2))
        return 0
    _emit(args, r, f"cleared {', '.join(r['tiers'])}: {r['host_removed']} host and {r['disk_removed']} disk "
                   f"entries removed; {r['pinned_kept']} pinned kept")
    return 0


def cmd_health(args) -> int:
    r = _server(args).health()
    answers = r.get("dp_ranks", [r])  # one per DP rank (usually one)
    ok = all(a["ok"] for a in answers)
    lines = ["ok" if ok else "UNHEALTHY"]
    for rank, h in enumerate(h for a in answers for h in a["ranks"]):
        lines += [f"  rank {rank} {t['tier']}: " + ("off" if not t["enabled"] else "ok" if t["ok"] else
                                                    f"ERROR {t['error']}") for t in h["tiers"]]
        if h["remote_breaker"] is not None:
            lines.append(f"  rank {rank} remote circuit breaker: {h['remote_breaker']}")
    _emit(args, r, "\n".join(lines))
    return 0 if ok else 1


def cmd_stats(args) -> int:
    if (args.server is None) == (args.dir is None):
        raise ValueError("stats needs exactly one of DIR (a cache directory) or --server URL")
    if args.server is not None:
        r = _server(args).stats()
        _emit(args, r, json.dumps(r, indent=2))
        return 0
    s = cache_admin.cache_stats(args.dir, _progress(not args.json, "reading headers"))
    models = "\n".join(f"  {m}: {v['entries']} entries, {v['bytes'] / 2**20:.1f} MiB" for m, v in s.models.items())
    text = (f"{s.entries} entries, {s.bytes / 2**20:.1f} MiB on disk, {s.raw_bytes / 2**20:.1f} MiB of KV, "
            f"compression {s.compression_ratio:.2f}x; {s.unreadable} unreadable, {s.quarantined} quarantined\n"
            f"models:\n{models or '  (none)'}\nage since written: {s.age}\nidle since last use: {s.idle}")
    _emit(args, {**asdict(s), "compression_ratio": s.compression_ratio}, text)
    return 0


def cmd_inspect(args) -> int:
    header = cache_admin.inspect_entry(args.dir, args.key)
    shown = {**header, "token_ids": header["token_ids"] if args.json else
             f"{len(header['token_ids'])} tokens: {header['token_ids'][:16]}..."}
    _emit(args, shown, "\n".join(f"{k}: {v}" for k, v in shown.items()))
    return 0


def cmd_verify(args) -> int:
    report = cache_admin.verify(args.dir, args.threads, _progress(not args.json, "verifying"), args.shared_group)
    lines = [f"checked {report.checked} files, {len(report.bad)} bad (moved to quarantine/)"]
    lines += [f"  {k}: {r}" for k, r in report.bad.items()]
    lines += _exposure_lines(report.exposed)
    _emit(args, report, "\n".join(lines))
    return 1 if report.bad else 0


def _exposure_lines(exposed: dict[str, str], shown: int = 10) -> list[str]:
    if not exposed:
        return []
    lines = [f"WARNING: {len(exposed)} paths are open to users the cache is not shared with; cached prompts "
             f"can be recovered from them (see 'Privacy' in docs/operations.md: chmod -R go-rwx DIR, "
             f"or --shared-group GROUP if the sharing is deliberate)"]
    lines += [f"  {path}: {reason}" for path, reason in list(exposed.items())[:shown]]
    if len(exposed) > shown:
        lines.append(f"  ... and {len(exposed) - shown} more (--json lists all)")
    return lines


def cmd_prune(args) -> int:
    if args.max_size is None and args.older_than is None and args.model is None:
        raise ValueError("prune needs at least one of --max-size, --older-than, --model")
    r = cache_admin.prune(args.dir, max_bytes=args.max_size, older_than_s=args.older_than,
                          model=args.model, dry_run=args.dry_run)
    verb = "would remove" if r.dry_run else "removed"
    _emit(args, r, f"{verb} {len(r.removed)} entries ({r.freed_bytes / 2**20:.1f} MiB); "
                   f"kept {r.kept_entries} ({r.kept_bytes / 2**20:.1f} MiB)")
    return 0


def cmd_export(args) -> int:
    n = cache_admin.export_archive(args.dir, args.archive, _progress(not args.json, "exporting"), args.shared_group)
    _emit(args, {"exported": n, "archive": args.archive}, f"exported {n} entries to {args.archive}")
    return 0


def cmd_import(args) -> int:
    r = cache_admin.import_archive(args.archive, args.dir, _progress(not args.json, "importing"), args.shared_group)
    lines = [f"imported {r.imported}, skipped {r.skipped_existing} already present, rejected {len(r.rejected)}"]
    lines += [f"  {k}: {v}" for k, v in r.rejected.items()]
    _emit(args, r, "\n".join(lines))
    return 1 if r.rejected else 0


def cmd_prepopulate(args) -> int:
    from .prepopulate import prepopulate  # needs transformers; imported only here
    r = prepopulate(args.model, args.input, args.cache_dir, chunk_size=args.chunk_size, kv_dtype=args.kv_dtype,
                    resume=not args.no_resume, model_id=args.model_id, progress=_progress(not args.json, "prepopulating"))
    _emit(args, r, f"{r.prompts} prompts: {r.chunks_written} chunks written, {r.chunks_present} already present, "
                   f"{r.skipped} skipped")
    return 0


def _add_shared_group(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shared-group", default=os.environ.get("LMCACHE_SHARED_DIR_GROUP") or None,
                   help="the group the directory is deliberately shared with (the servers' shared_dir_group); "
                        "default: private to the user")


def _add_server(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--server", required=required, help="the SGLang server, e.g. http://127.0.0.1:30000")
    p.add_argument("--api-key", default=os.environ.get("SGLANG_API_KEY") or None,
                   help="the server's (admin) API key; default: the SGLANG_API_KEY variable")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lmcache-sgl",
                                 description="Tools for an lmcache_sgl cache directory and a running server.")
    ap.add_argument("--json", action="store_true", help="print JSON")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("stats", help="a directory's entries, bytes, compression, models, ages; or a server's counters")
    p.add_argument("dir", nargs="?")
    _add_server(p, required=False)
    p.set_defaults(fn=cmd_stats)
    for name, what in (("lookup", "how many leading tokens of a prompt are cached, per tier"),
                       ("pin", "keep a prompt's cached prefix from eviction (host and disk)"),
                       ("unpin", "let a pinned prefix be evicted again")):
        p = sub.add_parser(name, help=what)
        _add_server(p)
        p.add_argument("--tokens", type=parse_tokens, help="token ids, e.g. 1,2,3")
        p.add_argument("--text", help="text, tokenized by the server")
        p.set_defaults(fn=cmd_prompt_op)
    p = sub.add_parser("clear", help="empty a server's cache: all tiers, one, or one model's entries")
    _add_server(p)
    p.add_argument("--tier", choices=TIERS)
    p.add_argument("--model", help="only this model's entries (host and disk)")
    p.set_defaults(fn=cmd_clear)
    p = sub.add_parser("health", help="a server's tiers: ok or the error; exit 1 if any is not ok")
    _add_server(p)
    p.set_defaults(fn=cmd_health)
    p = sub.add_parser("inspect", help="one entry's header")
    p.add_argument("dir")
    p.add_argument("key")
    p.set_defaults(fn=cmd_inspect)
    p = sub.add_parser("verify", help="check every file; bad ones go to quarantine/ (exit 1 if any)")
    p.add_argument("dir")
    p.add_argument("--threads", type=int, default=4)
    _add_shared_group(p)
    p.set_defaults(fn=cmd_verify)
    p = sub.add_parser("prune", help="remove entries by model, idle age, or to fit a size")
    p.add_argument("dir")
    p.add_argument("--max-size", type=parse_size, help="keep the most recently used entries that fit, e.g. 10GiB")
    p.add_argument("--older-than", type=parse_duration, help="remove entries idle longer, e.g. 7d")
    p.add_argument("--model", help="remove entries of this model (a model_name, or its part before '@')")
    p.add_argument("--dry-run", action="store_true")
    p.set_defaults(fn=cmd_prune)
    p = sub.add_parser("export", help="write the cache to one tar archive")
    p.add_argument("dir")
    p.add_argument("archive")
    _add_shared_group(p)
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser("import", help="add an archive's verified entries to a cache directory")
    p.add_argument("archive")
    p.add_argument("dir")
    _add_shared_group(p)
    p.set_defaults(fn=cmd_import)
    p = sub.add_parser("prepopulate", help="compute KV for a JSONL of prompts with transformers and store it")
    p.add_argument("--model", required=True, help="a local Hugging Face model directory")
    p.add_argument("--input", required=True, help='JSONL: {"text": ...} | {"messages": [...]} | {"token_ids": [...]}')
    p.add_argument("--cache-dir", required=True)
    p.add_argument("--chunk-size", type=int, default=256, help="must equal the servers' chunk_size")
    p.add_argument("--kv-dtype", default="float32", help="KV dtype of the servers that will read it")
    p.add_argument("--no-resume", action="store_true", help="recompute prompts already in the cache")
    p.add_argument("--model-id", help="the servers' model_id, if they set one (default: derived from --model)")
    p.set_defaults(fn=cmd_prepopulate)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, OSError) as e:
        if args.json:
            print(json.dumps({"error": str(e)}))
        print(f"lmcache-sgl {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
