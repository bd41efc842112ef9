"""Cut a prompt into documents at a separator's token ids.

A blend prompt looks like ``system # # doc1 # # doc2 # # question`` (the
separator is ``blend_special_str``). The separator's own tokens belong to no
segment, so a document's segment is the same token run wherever it sits.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence


class Segment(NamedTuple):
    """Prompt token positions [start, end); separator tokens excluded."""

    start: int
    end: int

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


def find_separators(token_ids: Sequence[int], sep_ids: Sequence[int]) -> list[int]:
    """Start positions of non-overlapping occurrences of ``sep_ids``, left to right."""
    n, m = len(token_ids), len(sep_ids)
    if m == 0:
        return []
    sep = list(sep_ids)
    found, i = [], 0
    while i + m <= n:
        if token_ids[i] == sep[0] and list(token_ids[i:i + m]) == sep:
            found.append(i)
            i += m
        else:
            i += 1
    return found


def split_segments(token_ids: Sequence[int], sep_ids: Sequence[int], min_tokens: int) -> list[Segment]:
    """The runs between separators (and before the first / after the last) of >= ``min_tokens`` tokens.

    Empty ``sep_ids`` gives no segments: without a separator there is nothing to blend.
    """
    if min_tokens < 1:
        raise ValueError(f"min_tokens={min_tokens} is invalid; allowed: an integer >= 1")
    if hasattr(token_ids, "tolist"):  # a tensor or array: compare plain ints
        token_ids = token_ids.tolist()
    starts = find_separators(token_ids, sep_ids)
    if not starts:
        return []
    m = len(sep_ids)
    bounds = [0] + [s + m for s in starts]  # segment starts
    ends = starts + [len(token_ids)]  # segment ends
    return [Segment(s, e) for s, e in zip(bounds, ends) if e - s >= min_tokens]


def separator_ids(encode: Callable[[str], Sequence[int]], text: str) -> list[int]:
    """The separator's token ids as they occur inside a prompt (``encode``: the served tokenizer, no BOS).

    Trailing whitespace is left out: byte-level BPE tokenizers (Llama 3, SmolLM2)
    join a space to the next word, so ``" # # The"`` is ``" #", " #", " The"`` and
    the ids of ``" # # "`` alone (``" #", " #", " "``) would never match.
    """
    ids = list(encode(text.rstrip() or text))
    if not ids:
        raise ValueError(f"blend_special_str={text!r} tokenizes to no tokens; allowed: a string with tokens")
    return ids
