"""Phases of the multi-turn benchmark over any engine client: rounds, noisy neighbour, statistics.

No HTTP here: a client (``Client``) sends one request, and these functions
decide who sends what and when, and time it. The workload (prompts, histories)
comes from ``workload_multiturn``.

Noisy neighbour: fillers first push the users' histories out of the device
pool and the host tier. Then, in the control phase, some decoders stream long
answers alone; in the noisy phase other decoders stream while returning users
send their next turn, whose history must come from the slowest tier (disk). The
decoders' inter-token latency (ITL) is compared between the two phases; in the
noisy phase only gaps that end while a returning request is in flight count.
"""

from __future__ import annotations

import threading
import time
from typing import NamedTuple, Protocol, Sequence

from workload_multiturn import Conversation, Tokenizer, decoder_prompt


class Client(Protocol):
    def generate(self, text: str, max_new_tokens: int) -> dict:
        """One streamed request: ``text`` (answer), ``ttft``, ``prompt``, ``completion``, ``cached``,
        ``device``, ``host``, ``disk`` (cached tokens per tier)."""

    def stream(self, text: str, max_new_tokens: int) -> list[float]:
        """One streamed request that ignores EOS: ``time.perf_counter()`` at each streamed chunk."""


class Load(NamedTuple):
    records: list[dict]  # one per request: user, round, and the client's dict
    wall: float  # seconds from the first request to the last answer
    t0: float  # perf_counter at the start
    t1: float  # perf_counter at the end


def pct(xs: Sequence[float], p: float) -> float:
    """The p-quantile (0..1) with linear interpolation; nan for no data."""
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def run_threads(targets) -> None:
    """Run each callable on its own thread; re-raise the first error after all have ended."""
    errors: list[BaseException] = []

    def guard(fn):
        try:
            fn()
        except BaseException as e:  # re-raised below, on the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=guard, args=(fn,)) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def describe(rec: dict) -> str:
    return (f"user {rec['user']} round {rec['round']}: prompt {rec['prompt']} cached {rec['cached']} (dev "
            f"{rec['device']} host {rec['host']} disk {rec['disk']}) ttft {rec['ttft']:.2f}s")


def run_users(client: Client, tok: Tokenizer, convs: Sequence[Conversation], n_rounds: int, max_new_tokens: int,
              stagger: float = 0.0, verbose: bool = False, label: str = "") -> Load:
    """Each conversation on its own thread does its next ``n_rounds`` turns in order; user k starts k*stagger in."""
    records: list[dict] = []
    lock = threading.Lock()

    def user(k: int, conv: Conversation) -> None:
        time.sleep(k * stagger)
        for _ in range(n_rounds):
            turn = conv.next_turn(tok)
            out = client.generate(turn.text, max_new_tokens)
            conv.answer(out["text"])
            rec = {"user": turn.user, "round": turn.round, **out}
            with lock:
                records.append(rec)
            if verbose:
                print(f"  {label}{describe(rec)}", flush=True)

    t0 = time.perf_counter()
    run_threads([lambda k=k, c=c: user(k, c) for k, c in enumerate(convs)])
    t1 = time.perf_counter()
    return Load(records, t1 - t0, t0, t1)


def push_out(client: Client, fillers: Sequence[str]) -> float:
    """Serve the fillers one by one (one new token each); returns the seconds it took."""
    t0 = time.perf_counter()
    for text in fillers:
        client.generate(text, 1)
    return time.perf_counter() - t0


def _decoders(client: Client, tok: Tokenizer, first: int, n: int, tokens: int):
    """(arrival times per decoder, filled in as they run; the callables that run them): prompts first..first+n-1."""
    arrivals: list[list[float]] = [[] for _ in range(n)]

    def one(i: int) -> None:
        arrivals[i] = client.stream(decoder_prompt(tok, first + i), tokens)

    return arrivals, [lambda i=i: one(i) for i in range(n)]


def gaps(arrivals: Sequence[Sequence[float]], window: tuple[float, float] | None = None) -> list[float]:
    """Inter-chunk gaps of every stream after its first chunk; with a window, only gaps ending inside it."""
    out = []
    for times in arrivals:
        for a, b in zip(times, times[1:]):
            if window is None or window[0] <= b <= window[1]:
                out.append(b - a)
    return out


def itl_stats(xs: Sequence[float]) -> dict:
    return {"n": len(xs), "p50": pct(xs, 0.5), "p99": pct(xs, 0.99), "max": max(xs, default=float("nan"))}


def noisy_neighbour(client: Client, tok: Tokenizer, returning: Sequence[Conversation], fillers: Sequence[str],
                    decoders: int, decode_tokens: int, max_new_tokens: int, lead_s: float) -> dict:
    """Control phase (decoders alone), then noisy phase (other decoders + returning users after ``lead_s``)."""
    push_s = push_out(client, fillers)
    control, fns = _decoders(client, tok, 0, decoders, decode_tokens)
    run_threads(fns)
    noisy, fns = _decoders(client, tok, decoders, decoders, decode_tokens)
    back: list[Load] = []

    def returners() -> None:
        time.sleep(lead_s)  # let the decoders reach their steady decode first
        back.append(run_users(client, tok, returning, 1, max_new_tokens))

    run_threads(fns + [returners])
    window = (back[0].t0, back[0].t1)
    ctl, hit = itl_stats(gaps(control)), itl_stats(gaps(noisy, window))
    return {"push_out_s": push_s, "fillers": len(fillers), "returning": back[0].records,
            "itl_control": ctl, "itl_noisy": hit, "itl_noisy_all": itl_stats(gaps(noisy)),
            "p99_ratio": hit["p99"] / ctl["p99"], "p50_ratio": hit["p50"] / ctl["p50"],
            "window_s": window[1] - window[0]}
