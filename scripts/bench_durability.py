"""Put -> durable latency of ``disk_write_policy: write_through``: how long a chunk lives only in RAM.

Puts chunks into a ``TieredStore`` (host tier plus a disk directory) at a fixed
rate, or back to back, and watches the directory from another thread: a
chunk is durable once its file exists (the disk tier fsyncs a temporary file
and renames it into place, so a visible file is a complete one). Prints p50 /
p99 / max of put -> visible, and the bound ``max_pending_writes`` x the mean
time of one chunk write. No flush is called before the measurement ends; a chunk whose write-through
was dropped (queue full) is counted, not timed (it waits for eviction).

  .venv/bin/python scripts/bench_durability.py --chunks 200 --rate 50
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from lmcache_sgl import CacheConfig, ChunkLayout, ModelFingerprint, TieredStore, prefix_keys


def _chunk_path(root: Path, key: str) -> Path:
    return root / key[:2] / f"{key}.kv"  # docs/disk_format.md: <first two hex digits>/<key>.kv


def _watch(root: Path, put_at: dict[str, float], seen_at: dict[str, float], stop: threading.Event) -> None:
    while not stop.is_set():
        for key in [k for k in list(put_at) if k not in seen_at]:
            if _chunk_path(root, key).is_file():
                seen_at[key] = time.monotonic()
        time.sleep(0.001)


def run(args: argparse.Namespace) -> dict:
    fp = ModelFingerprint("bench-durability", "bfloat16", num_layers=args.layers, num_kv_heads=args.kv_heads,
                          head_dim=args.head_dim)
    layout = ChunkLayout(fp, args.chunk_size)
    tokens = np.random.default_rng(0).integers(0, 50_000, args.chunks * args.chunk_size).tolist()
    keys = prefix_keys(fp, tokens, args.chunk_size)
    kv = torch.randn(layout.shape(args.chunk_size)).to(layout.dtype)  # one payload, distinct keys
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = CacheConfig(chunk_size=args.chunk_size, max_local_cpu_size=args.host_gib, local_disk=tmp,
                          max_local_disk_size=1000, max_pending_writes=args.max_pending_writes)
        put_at: dict[str, float] = {}
        seen_at: dict[str, float] = {}
        stop = threading.Event()
        watcher = threading.Thread(target=_watch, args=(root, put_at, seen_at, stop), daemon=True)
        with TieredStore(cfg, layout) as store:
            watcher.start()
            start = time.monotonic()
            for i, key in enumerate(keys):
                if args.rate > 0:
                    time.sleep(max(0.0, start + i / args.rate - time.monotonic()))
                put_at[key] = time.monotonic()
                store.put(key, tokens[i * args.chunk_size:(i + 1) * args.chunk_size], kv, start_pos=i * args.chunk_size)
            deadline = time.monotonic() + 600  # a dropped write-through is written only on eviction or flush
            while store.stats().pending_writes and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.05)  # one more scan of the directory
            elapsed = time.monotonic() - start
            stop.set()
            stats = store.stats()
    lat = np.array([seen_at[k] - put_at[k] for k in keys if k in seen_at]) * 1000
    # Back to back, the writer never idles: elapsed / writes is its service time per chunk.
    write_ms = elapsed * 1000 / max(1, stats.writebacks) if args.rate <= 0 else float("nan")
    return {"chunk_mib": layout.chunk_bytes / 2**20, "chunks": len(keys), "durable": len(lat),
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "max_ms": float(lat.max()), "write_ms_per_chunk": write_ms,
            "bound_ms": args.max_pending_writes * write_ms, "dropped": stats.write_through_dropped}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunks", type=int, default=200)
    p.add_argument("--rate", type=float, default=0.0, help="puts per second; 0: back to back")
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=30)  # SmolLM2-135M's KV shape
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--host-gib", type=float, default=4.0)
    p.add_argument("--max-pending-writes", type=int, default=64)
    r = run(p.parse_args())
    print(f"{r['chunks']} chunks of {r['chunk_mib']:.2f} MiB, {r['durable']} durable, "
          f"{r['dropped']} write-throughs dropped (queue full)")
    print(f"put -> durable: p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, max {r['max_ms']:.1f} ms")
    if r["write_ms_per_chunk"] == r["write_ms_per_chunk"]:  # measured (back to back) only
        print(f"writer service time {r['write_ms_per_chunk']:.1f} ms/chunk; bound max_pending_writes x that = "
              f"{r['bound_ms']:.0f} ms")


if __name__ == "__main__":
    main()
