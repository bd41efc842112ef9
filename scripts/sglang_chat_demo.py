#!/usr/bin/env python
"""Multi-user chat on `sglang.launch_server --enable-lmcache`, with a restart.

Starts SGLang on SmolLM2-135M-Instruct (CPU flags) with our tiered cache: a
small device pool (--max-total-tokens), a small host tier and a disk dir. Three
users share a system prompt and each chats about their own document; their
turns are interleaved, so the device pool evicts the others' histories and the
next turn finds them in the host tier or on disk. For every request it prints
the prompt tokens, the cached tokens per tier (SGLang's own
``meta_info.cached_tokens_details``: device / host / storage = our disk), the
time to the first token and the answer's first words.

Then the server is stopped (after /flush_cache, so the host tier is written
down) and started again on the same disk dir: a returning user's next turn is
served from disk.

    .venv/bin/python scripts/sglang_chat_demo.py [--cache-dir DIR] [--port P] [--keep-cache]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import requests

from lmcache_sgl.adapters.sglang.local_server import LocalServer

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 64  # tokens per chunk; a multiple of --page-size 16

SYSTEM = (
    "You are Orbit, the support assistant of Northwind Logistics. Answer in two or three short sentences, "
    "quote numbers from the customer's document when they matter, and never invent shipment data. "
    "Northwind ships freight by road, rail and sea between Europe and North Africa. Standard delivery takes "
    "four to six working days; express delivery takes two. Claims for damaged goods must be filed within "
    "fourteen days of delivery with photos and the waybill number. Refunds are paid to the original payment "
    "method within ten working days. Hazardous goods need a declaration form before pickup. Customers may "
    "change the delivery address until the parcel leaves the last hub. Support is open from eight to eight, "
    "Monday to Saturday, and urgent cases can be escalated to a shift supervisor."
)

DOCS = {
    "alice": ("Order NW-4471: 12 pallets of ceramic tiles from Valencia to Tunis, shipped by sea on 3 March, "
              "declared value 18,400 euros, insured. Two pallets arrived with broken corners on 11 March; "
              "photos were taken at the dock. The consignee is Medina Build SARL. The waybill lists a gross "
              "weight of 9.6 tonnes and a delivery window of 10 to 12 March. Invoice 2291 is still unpaid."),
    "bruno": ("Order NW-5820: 40 boxes of laptop chargers from Hamburg to Lyon by road, express service, "
              "picked up 5 May, promised for 7 May, delivered 9 May. Declared value 6,200 euros. The receiver "
              "signed with a note saying three boxes were wet. The customer paid 480 euros for express and asks "
              "whether the surcharge is refundable. Account manager: Petra Lange. Customer since 2019."),
    "chloe": ("Order NW-6003: 3 drums of industrial solvent, class 3 flammable liquid, from Rotterdam to Algiers "
              "by sea. Pickup is planned for 22 June but the hazardous goods declaration has not been uploaded. "
              "The customer wants to add a fourth drum and change the delivery address to the Oran depot. Value "
              "2,900 euros. Contact: Karim B., logistics office, reachable mornings only."),
}

QUESTIONS = {
    "alice": ["Here is my order. What should I do about the broken pallets?", "How long do I have to file the claim?",
              "Will the refund go to my bank card?", "Can you summarise the whole case in one line?"],
    "bruno": ["My delivery was two days late. Is the express surcharge refundable?",
              "Three boxes were wet. Can I claim for them too?", "Who do I talk to if this gets urgent?",
              "What is my account manager's name?"],
    "chloe": ["Can this shipment be picked up on 22 June as planned?", "Can I still change the delivery address?",
              "And can I add a fourth drum?", "What is the total declared value now?"],
}


def model_path() -> Path:
    from lmcache_sgl.models import ensure_smollm2

    return Path(ensure_smollm2())


class Server(LocalServer):
    """The demo's server: streamed /generate with TTFT and per-tier cached tokens."""

    def generate(self, text: str, max_new_tokens: int) -> dict:
        """Streamed /generate: TTFT is the time to the first streamed chunk; cache stats from the last one."""
        body = {"text": text, "stream": True,
                "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0}}
        t0 = time.perf_counter()
        ttft = None
        last = None
        with requests.post(self.url("/generate"), json=body, stream=True, timeout=600) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line or not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                if ttft is None:
                    ttft = time.perf_counter() - t0
                last = json.loads(data)
        total = time.perf_counter() - t0
        meta = last["meta_info"]
        details = meta.get("cached_tokens_details") or {}
        cached = meta.get("cached_tokens", 0)
        return {"text": last["text"], "ttft": ttft if ttft is not None else total, "latency": total,
                "prompt": meta.get("prompt_tokens", 0), "completion": meta.get("completion_tokens", 0),
                "cached": cached, "device": details.get("device", cached if not details else 0),
                "host": details.get("host", 0), "disk": details.get("storage", 0)}


def lmcache_args(cfg_dir: Path, disk: Path, chunk: int = CHUNK, host_gib: float = 0.02,
                 disk_gib: float = 2.0, extra: dict | None = None) -> list[str]:
    cfg = cfg_dir / "lmcache.yaml"
    cfg.write_text(f"chunk_size: {chunk}\nlocal_cpu: true\nmax_local_cpu_size: {host_gib!r}\n"
                   f"local_disk: {disk}\nmax_local_disk_size: {disk_gib!r}\n"
                   + "".join(f"{k}: {v}\n" for k, v in (extra or {}).items()))
    return ["--enable-lmcache", "--lmcache-config-file", str(cfg)]


class Chat:
    def __init__(self, tok, user: str) -> None:
        self.tok = tok
        self.user = user
        self.messages = [{"role": "system", "content": SYSTEM}]
        self.turn = 0

    def next_prompt(self) -> str:
        q = QUESTIONS[self.user][self.turn]
        if self.turn == 0:
            q = f"{DOCS[self.user]}\n\n{q}"
        self.messages.append({"role": "user", "content": q})
        self.turn += 1
        return self.tok.apply_chat_template(self.messages, tokenize=False, add_generation_prompt=True)

    def answer(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text.strip()})


def background_prompt(tok, n_tokens: int) -> str:
    """An unrelated chat of about n_tokens tokens (its own system prompt: no prefix shared with the users)."""
    words = ("inventory audit report for warehouse section bay aisle shelf pallet count checked verified "
             "signed recorded").split()
    body, i = [], 0
    while True:
        body.append(f"{words[i % len(words)]} {i}")
        i += 1
        msgs = [{"role": "system", "content": "You check inventory lists."},
                {"role": "user", "content": " ".join(body)}]
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        if i % 8 == 0 and len(tok.encode(text, add_special_tokens=False)) >= n_tokens:
            return text


HEADER = f"{'phase':<8} {'user':<6} {'turn':>4} {'prompt':>6} {'cached':>6} {'device':>6} {'host':>5} " \
         f"{'disk':>5} {'ttft_s':>7}  answer"


def show(phase: str, chat: Chat, out: dict) -> None:
    words = " ".join(out["text"].split()[:10])
    print(f"{phase:<8} {chat.user:<6} {chat.turn:>4} {out['prompt']:>6} {out['cached']:>6} {out['device']:>6} "
          f"{out['host']:>5} {out['disk']:>5} {out['ttft']:>7.2f}  {words}...", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "lmcache_sgl" / "demo-cache",
                    help="disk tier directory (default ~/.cache/lmcache_sgl/demo-cache)")
    ap.add_argument("--port", type=int, default=None, help="server port (default: a free one)")
    ap.add_argument("--keep-cache", action="store_true",
                    help="keep the disk dir's contents from an earlier run (default: start empty)")
    ap.add_argument("--max-total-tokens", type=int, default=512,
                    help="device KV pool in tokens; one history (~450 tokens) nearly fills it")
    ap.add_argument("--host-gib", type=float, default=0.02, help="host tier budget in GiB (SmolLM2 fp32: "
                    "a 64-token chunk is 2.8 MiB, so 0.02 GiB holds 7 chunks)")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    model = model_path()
    tok = AutoTokenizer.from_pretrained(str(model))
    disk = args.cache_dir.expanduser()
    if disk.exists() and not args.keep_cache:
        shutil.rmtree(disk)
    disk.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="sglang-chat-demo-"))
    lm_args = lmcache_args(work, disk, host_gib=args.host_gib)
    print(f"model {model}\nconfig {work / 'lmcache.yaml'}: chunk_size {CHUNK}, host {args.host_gib} GiB, "
          f"disk {disk}\ndevice pool --max-total-tokens {args.max_total_tokens}; logs in {work}", flush=True)

    chats = {u: Chat(tok, u) for u in DOCS}
    server = None
    try:
        print("starting server 1 ...", flush=True)
        server = Server(model, work / "server1.log", lm_args, port=args.port, pool_tokens=args.max_total_tokens)
        print(f"server 1 ready after {server.startup_s:.0f} s\n\n{HEADER}", flush=True)
        for _ in range(3):  # round-robin: each user's turn evicts the others' histories from the device pool
            for chat in chats.values():
                out = server.generate(chat.next_prompt(), args.max_new_tokens)
                chat.answer(out["text"])
                show("run 1", chat, out)
        # /flush_cache writes the host tier down but drops the device tree unsaved: KV is saved when the
        # device pool evicts it. Another tenant's long request (no shared prefix) evicts the chat histories,
        # including the hot system prompt, before the shutdown.
        bg = background_prompt(tok, args.max_total_tokens - 64)
        out = server.generate(bg, 1)
        print(f"{'run 1':<8} {'other':<6} {'-':>4} {out['prompt']:>6} {out['cached']:>6} {out['device']:>6} "
              f"{out['host']:>5} {out['disk']:>5} {out['ttft']:>7.2f}  (another tenant's long request)", flush=True)
        server.flush()  # host-tier chunks are written down to disk
        server.stop()
        server = None

        print("\nrestarting the server on the same disk dir ...", flush=True)
        server = Server(model, work / "server2.log", lm_args, port=args.port, pool_tokens=args.max_total_tokens)
        print(f"server 2 ready after {server.startup_s:.0f} s\n\n{HEADER}", flush=True)
        chat = chats["alice"]
        out = server.generate(chat.next_prompt(), args.max_new_tokens)
        chat.answer(out["text"])
        show("restart", chat, out)
        print(f"\nafter the restart, {out['disk']} of alice's {out['prompt']} prompt tokens came from disk "
              f"({out['cached']} cached in all)")
        n_files = sum(1 for p in disk.rglob("*") if p.is_file())
        print(f"disk tier {disk}: {n_files} files")
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
