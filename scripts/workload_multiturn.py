"""The multi-turn chat workload shared by the SGLang and vLLM benchmarks; no HTTP, no engine.

N users share one system prompt. In round 0 each user pastes their own
synthetic plant report (about ``doc_tokens`` tokens) and asks a question; in
rounds 1.. they ask one more question each. Every round's prompt is the whole
history so far: system prompt, earlier questions and earlier answers. So a
user's prompt of round r+1 starts with their prompt of round r (the prefix a
cache can serve), and histories grow every round.

Everything is a function of ``WorkloadSpec`` (users, rounds, doc_tokens, seed)
and of the answers fed back: the same spec and the same answers give the same
messages, texts and token ids, whichever engine serves them. ``scripted_answer``
gives engine-independent answers, for runs whose histories must not depend on
what the model said.

A driver asks a ``Conversation`` for ``next_turn(tok)``, sends the text (or the
ids), and feeds the engine's reply to ``answer``. ``turn_order`` is the order
requests are issued when users take turns one at a time (round-major); with
concurrent users (one thread each), user u starts ``u * stagger`` seconds in and
runs its rounds in order.

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/ is not a package
    from workload_multiturn import WorkloadSpec, conversations
"""

from __future__ import annotations

import random
from typing import NamedTuple, Protocol, Sequence

SYSTEM = (
    "You are a careful analyst. Read the report the user pastes, answer each question in one or two "
    "sentences, quote the numbers you rely on, and say so when the report does not contain the answer. "
    "Do not speculate about causes the report does not mention. Keep units as written in the report."
)

PLACES = ["Lyon", "Porto", "Gdansk", "Tunis", "Bilbao", "Turin", "Ghent", "Aarhus", "Split", "Brno", "Cork", "Graz"]
ITEMS = ["pumps", "valves", "cables", "sensors", "panels", "filters", "motors", "bearings", "gaskets", "relays"]
QUESTIONS = ["Which site had the highest output?", "What was the total number of defects reported?",
             "Which item appears most often?", "Summarise the report in one sentence.",
             "Which site should be audited first, and why?", "Were there any delays?",
             "What is the average output per site?", "Which numbers look inconsistent?"]
_SEED_STRIDE = 100_003  # seed s, user u -> document rng seed 1000 + u + s * stride (seed 0: the old documents)


class Tokenizer(Protocol):
    """What the workload needs of a Hugging Face tokenizer."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def apply_chat_template(self, messages, tokenize: bool = ..., add_generation_prompt: bool = ...): ...


class WorkloadSpec(NamedTuple):
    users: int
    rounds: int
    doc_tokens: int
    seed: int = 0

    def check(self) -> "WorkloadSpec":
        for name in ("users", "rounds", "doc_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"workload {name}={getattr(self, name)}: must be >= 1")
        if self.seed < 0:
            raise ValueError(f"workload seed={self.seed}: must be >= 0")
        return self


class Turn(NamedTuple):
    """One request: user ``user`` in round ``round``; ``messages`` is the whole history up to this question."""
    user: int
    round: int
    messages: tuple[dict, ...]
    text: str  # the chat template applied, with the generation prompt
    token_ids: tuple[int, ...]  # text encoded without special tokens (the template adds its own)


def document(tok: Tokenizer, user: int, n_tokens: int, seed: int = 0) -> str:
    """A synthetic plant report of at least ``n_tokens`` tokens, different for every (user, seed)."""
    rnd = random.Random(1000 + user + seed * _SEED_STRIDE)
    lines = [f"Quarterly report {user + 1} of the northern division."]
    while len(tok.encode(" ".join(lines), add_special_tokens=False)) < n_tokens:
        lines.append(f"Site {rnd.choice(PLACES)} produced {rnd.randrange(100, 9999)} {rnd.choice(ITEMS)} in week "
                     f"{rnd.randrange(1, 53)}, with {rnd.randrange(0, 90)} defects and a delay of "
                     f"{rnd.randrange(0, 12)} days.")
    return " ".join(lines)


def question(user: int, rnd: int, seed: int = 0) -> str:
    return QUESTIONS[(user + rnd + seed) % len(QUESTIONS)]


def scripted_answer(user: int, rnd: int) -> str:
    """An engine-independent answer, for histories that must not depend on what a model generated."""
    return f"Noted: question {rnd + 1} of user {user + 1} is answered from the report's figures."


def render(tok: Tokenizer, messages: Sequence[dict]) -> tuple[str, tuple[int, ...]]:
    """(chat text with the generation prompt, its token ids)."""
    text = tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return text, tuple(tok.encode(text, add_special_tokens=False))


class Conversation:
    """One user's chat: ``next_turn`` appends the next question, ``answer`` appends the reply.

    Turns alternate strictly (next_turn, answer, next_turn, ...); anything else
    raises RuntimeError, so a driver bug cannot silently reorder a history.
    """

    def __init__(self, spec: WorkloadSpec, user: int, doc: str) -> None:
        if not 0 <= user < spec.users:
            raise ValueError(f"user {user}: allowed 0..{spec.users - 1}")
        self.spec, self.user, self.doc = spec, user, doc
        self.messages: list[dict] = [{"role": "system", "content": SYSTEM}]
        self.round = 0  # the round of the next turn
        self._awaiting_answer = False

    @property
    def done(self) -> bool:
        return self.round >= self.spec.rounds and not self._awaiting_answer

    def next_turn(self, tok: Tokenizer) -> Turn:
        if self._awaiting_answer:
            raise RuntimeError(f"user {self.user} round {self.round - 1}: answer() the last turn first")
        if self.round >= self.spec.rounds:
            raise RuntimeError(f"user {self.user}: all {self.spec.rounds} rounds done")
        q = question(self.user, self.round, self.spec.seed)
        self.messages.append({"role": "user", "content": f"{self.doc}\n\n{q}" if self.round == 0 else q})
        text, ids = render(tok, self.messages)
        turn = Turn(self.user, self.round, tuple(dict(m) for m in self.messages), text, ids)
        self.round += 1
        self._awaiting_answer = True
        return turn

    def answer(self, text: str) -> None:
        if not self._awaiting_answer:
            raise RuntimeError(f"user {self.user}: answer() without a pending turn")
        self.messages.append({"role": "assistant", "content": text.strip()})
        self._awaiting_answer = False


def conversations(tok: Tokenizer, spec: WorkloadSpec) -> list[Conversation]:
    """One fresh ``Conversation`` per user, each with its own document."""
    spec.check()
    return [Conversation(spec, u, document(tok, u, spec.doc_tokens, spec.seed)) for u in range(spec.users)]


def turn_order(spec: WorkloadSpec) -> list[tuple[int, int]]:
    """(user, round) in issue order when users take turns one at a time: round 0 of every user, then round 1, ..."""
    return [(u, r) for r in range(spec.rounds) for u in range(spec.users)]


def scripted_turns(tok: Tokenizer, spec: WorkloadSpec) -> list[Turn]:
    """Every turn in ``turn_order``, with ``scripted_answer`` histories: a fixed stream for any engine."""
    convs = conversations(tok, spec)
    turns = []
    for u, r in turn_order(spec):
        turns.append(convs[u].next_turn(tok))
        convs[u].answer(scripted_answer(u, r))
    return turns


# -- the noisy-neighbour phase's other traffic: decoders (long answers) and fillers (push histories out) --

DECODER_TOPICS = ["the history of canal locks", "how a bicycle gear hub works", "the water cycle in a forest",
                  "how bread dough rises", "the life of a lighthouse keeper", "how tides are predicted"]
_FILLER_WORDS = ("inventory audit for warehouse section bay aisle shelf pallet count checked verified signed "
                 "recorded").split()


def decoder_prompt(tok: Tokenizer, i: int) -> str:
    """A short chat asking for a long answer (decoder i); no prefix beyond the template is shared with the users."""
    topic = DECODER_TOPICS[i % len(DECODER_TOPICS)]
    msgs = [{"role": "user", "content": f"Writer {i + 1}: explain {topic} in a long, detailed essay."}]
    return render(tok, msgs)[0]


def filler_prompts(tok: Tokenizer, total_tokens: int, each_tokens: int, seed: int = 0) -> list[str]:
    """Unrelated one-turn chats of about ``each_tokens`` tokens, at least ``total_tokens`` together.

    Each starts with its own system line, so none shares a cacheable prefix
    with another or with the users: serving them pushes the users' histories
    out of the device pool and the host tier.
    """
    if total_tokens < 1 or each_tokens < 16:
        raise ValueError(f"filler_prompts: total_tokens={total_tokens} (>= 1), each_tokens={each_tokens} (>= 16)")
    out, got = [], 0
    while got < total_tokens:
        text, n = _filler(tok, f"{seed}-{len(out)}", each_tokens)
        out.append(text)
        got += n
    return out


def _filler(tok: Tokenizer, tag: str, n_tokens: int) -> tuple[str, int]:
    """One filler chat of at least ``n_tokens`` tokens (within a few words of it); (text, its token count)."""
    words: list[str] = []
    while True:
        words.extend(f"{_FILLER_WORDS[(len(words) + j) % len(_FILLER_WORDS)]} {len(words) + j}" for j in range(8))
        msgs = [{"role": "system", "content": f"Audit log {tag}."}, {"role": "user", "content": " ".join(words)}]
        text, ids = render(tok, msgs)
        if len(ids) >= n_tokens:
            return text, len(ids)
