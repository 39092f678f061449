"""Generation health: does the model still write text, or has it collapsed into repeating itself?

Gradient ascent is known to break a model this way while its perplexity on held-out text still looks
tolerable: greedy continuations turn into one token or one phrase over and over. We continue the start of a
few general-text sequences greedily and count how much of each continuation repeats itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..io.models import Runtime
from ..measure.extraction import greedy_continue


def ngrams(tokens: Sequence[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def repeated_ngram_share(tokens: Sequence[int], n: int) -> float | None:
    """Share of the n-grams of `tokens` that repeat an n-gram seen earlier in `tokens`; None without any n-gram.

    One token over and over gives (L-n)/(L-n+1), close to 1; text whose n-grams are all distinct gives 0.
    """
    grams = ngrams(tokens, n)
    if not grams:
        return None
    seen: set[tuple[int, ...]] = set()
    repeats = 0
    for gram in grams:
        repeats += gram in seen
        seen.add(gram)
    return repeats / len(grams)


def distinct_share(continuations: Sequence[Sequence[int]], n: int) -> float | None:
    """distinct-n over all continuations together: distinct n-grams / n-grams. It also falls when every prompt
    gets the same continuation, which the per-continuation repeated share cannot see."""
    grams = [gram for tokens in continuations for gram in ngrams(tokens, n)]
    return len(set(grams)) / len(grams) if grams else None


def generation_health(model, general_ids: list[list[int]], runtime: Runtime, *, prompts: int = 16,
                      prompt_tokens: int = 32, new_tokens: int = 64, n: int = 3, batch_size: int = 8,
                      pad_id: int = 0) -> dict:
    """Greedy continuations of the first `prompt_tokens` tokens of up to `prompts` general sequences.

    `repeated_ngram_share` is the mean over prompts of `repeated_ngram_share(continuation, n)` (normal text:
    low; a collapsed model: near 1); `distinct_n` is `distinct_share` of all continuations.
    """
    if n < 1 or new_tokens < n or prompt_tokens < 1 or prompts < 1:
        raise ValueError(f"generation_health needs n >= 1, new_tokens >= n, prompt_tokens >= 1 and prompts >= 1; "
                         f"got n={n}, new_tokens={new_tokens}, prompt_tokens={prompt_tokens}, prompts={prompts}")
    starts = [list(ids[:prompt_tokens]) for ids in general_ids[:prompts] if ids]
    continuations = greedy_continue(model, starts, [new_tokens] * len(starts), runtime, batch_size, pad_id)
    shares = [repeated_ngram_share(tokens, n) for tokens in continuations]
    return {
        "repeated_ngram_share": float(np.mean(shares)) if shares else None,
        "repeated_ngram_share_max": float(np.max(shares)) if shares else None,
        "distinct_n": distinct_share(continuations, n),
        "n": n,
        "prompts": len(starts),
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
    }
