"""Sampling attack: greedy decoding is one draw; an attacker can draw many.

For each forget sequence x_1..x_T, with P = min(prefix_tokens, T // 2), draw `samples` continuations of
length T - P from the prefix x_1..x_P with top-k and temperature sampling:

    p'(v) ∝ exp(logit_v / temperature)   over the k largest logits (all logits when k = 0)

The sequence is extracted when any sample equals the suffix x_{P+1}..x_T exactly. There is no MA here, so
the status under attack is "extractable" when extracted (and verbatim then too), "not_extracted" otherwise.
Holdout sequences are sampled the same way as a control: unseen text should almost never be extracted.
"""

from __future__ import annotations

import numpy as np
import torch

from ...io.models import Runtime
from ...measure.band import EXTRACTABLE
from ...measure.extraction import continue_prompts
from .common import AttackContext, counts, sequence_row

NOT_EXTRACTED = "not_extracted"


def lcs_length(a: list[int], b: list[int]) -> int:
    """Length of the longest common subsequence, bit-parallel (Crochemore et al. 2001; Hyyrö 2004).

    Bit i of `v` stands for position i of `a`. A zero bit marks where the LCS grew, so after every token of
    `b` the number of zero bits among the len(a) bits is the LCS of `a` and the part of `b` seen so far.
    It gives the same number as the quadratic table, with one big-integer operation per token of `b`.
    """
    match: dict[int, int] = {}
    for i, token in enumerate(a):
        match[token] = match.get(token, 0) | (1 << i)
    ones = (1 << len(a)) - 1
    v = ones
    for token in b:
        u = v & match.get(token, 0)
        v = ((v + u) | (v - u)) & ones
    return len(a) - v.bit_count()


def rouge_l(candidate: list[int], reference: list[int]) -> float:
    """ROUGE-L F1 on token ids: LCS precision and recall, harmonic mean (beta = 1, as the rouge_score package).

    On token ids it is exact and needs no text; rouge_score would re-split decoded text into words.
    """
    lcs = lcs_length(reference, candidate)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(candidate), lcs / len(reference)
    return 2 * precision * recall / (precision + recall)


def next_token(logits: torch.Tensor, top_k: int, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """One draw per row of `logits` (batch, vocab) from the top-k, temperature-scaled distribution."""
    logits = logits.float() / temperature
    if 0 < top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))  # ties with the k-th value stay in
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)


def sample_continuations(model, prompts: list[list[int]], new_tokens: list[int], runtime: Runtime, batch_size: int,
                         pad_id: int, top_k: int, temperature: float, seed: int) -> list[list[int]]:
    """Sample `new_tokens[i]` tokens after each prompt, batched with a KV cache as measure.extraction decodes."""
    generator = torch.Generator(device=runtime.device).manual_seed(seed)
    return continue_prompts(model, prompts, new_tokens, runtime, batch_size, pad_id,
                            lambda logits: next_token(logits, top_k, temperature, generator))


def _sample_set(ctx: AttackContext, token_lists: list[list[int]]) -> list[dict]:
    """For each sequence: how many samples reproduce the suffix exactly, and the best ROUGE-L."""
    s = ctx.settings
    splits = [min(ctx.audit_settings.prefix_tokens, len(ids) // 2) for ids in token_lists]
    prompts = [ids[:p] for ids, p in zip(token_lists, splits, strict=True) for _ in range(s.samples)]
    lengths = [len(ids) - p for ids, p in zip(token_lists, splits, strict=True) for _ in range(s.samples)]
    drawn = sample_continuations(ctx.wrap(ctx.model), prompts, lengths, ctx.runtime,
                                 2 * ctx.audit_settings.batch_size, ctx.pad_id, s.top_k, s.temperature, s.seed)
    results = []
    for k, (ids, p) in enumerate(zip(token_lists, splits, strict=True)):
        suffix = ids[p:]
        mine = drawn[k * s.samples : (k + 1) * s.samples]
        hits = sum(sample == suffix for sample in mine)
        results.append({"prefix_tokens": p, "suffix_tokens": len(suffix), "extracted": hits > 0,
                        "hits": hits, "best_rouge_l": max(rouge_l(sample, suffix) for sample in mine)})
    return results


def sampling_attack(ctx: AttackContext) -> dict:
    s = ctx.settings
    forget = ctx.sets["forget"]
    results = _sample_set(ctx, ctx.encode(forget, "forget"))
    rows = [sequence_row(ctx, seq, EXTRACTABLE if r["extracted"] else NOT_EXTRACTED, r["extracted"], **r)
            for seq, r in zip(forget, results, strict=True)]
    holdout = ctx.sets["holdout"]
    rng = np.random.default_rng(s.seed)
    chosen = sorted(rng.permutation(len(holdout))[: s.holdout_control].tolist())
    control = _sample_set(ctx, ctx.encode([holdout[i] for i in chosen], "holdout")) if chosen else []
    return {
        "description": f"{s.samples} samples (top_k {s.top_k}, temperature {s.temperature}) of the suffix after "
                       "the verbatim prefix; extracted = some sample equals the suffix exactly. No MA here: status "
                       "is 'extractable' (and verbatim) when extracted, else 'not_extracted'. best_rouge_l is "
                       "ROUGE-L F1 over token ids. The holdout is sampled the same way as a control.",
        "settings": {"samples": s.samples, "top_k": s.top_k, "temperature": s.temperature, "seed": s.seed,
                     "prefix_tokens": ctx.audit_settings.prefix_tokens},
        **counts(rows),
        "forget_extracted": sum(r["extracted"] for r in results),
        "holdout_n": len(control),
        "holdout_extracted": sum(r["extracted"] for r in control),
        "holdout_extraction_rate": float(np.mean([r["extracted"] for r in control])) if control else None,
        "holdout_mean_best_rouge_l": float(np.mean([r["best_rouge_l"] for r in control])) if control else None,
        "sequences": rows,
    }
