"""Extraction likelihood EL_n (Jang et al. 2022), exact and fast.

    EL_n(x) = 1/(T-n) * sum_{t=1..T-n} OVERLAP_n(greedy_continuation(x_1..x_t, length T-t), x_{t+1}..x_T)

The reference runs one greedy generation per prefix: T-n generations of up to T-1 tokens each. We get the
same continuations with far less work from one fact: greedy decoding is deterministic, so where the
teacher-forced argmax after x_1..x_t already equals x_{t+1}, the continuation of x_1..x_t is x_{t+1}
followed by the continuation of x_1..x_{t+1}. Only prefixes where the model's guess diverges from the
text ("divergence points") need real decoding, and those are decoded together in batches with a KV cache.
A memorized sequence has few divergence points, so EL costs little more than the forward pass that gave MA.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from ..io.models import Runtime, context_length
from ..io.tokens import pad
from .scoring import TokenScores


def overlap(candidate: list[int], reference: list[int], n: int) -> float:
    """Share of the n-grams of `candidate` (with multiplicity) that occur among the n-grams of `reference`."""
    grams = [tuple(candidate[i : i + n]) for i in range(len(candidate) - n + 1)]
    present = {tuple(reference[i : i + n]) for i in range(len(reference) - n + 1)}
    return sum(g in present for g in grams) / len(grams)


def el_from_continuations(ids: list[int], continuations: dict[int, list[int]], n: int) -> float | None:
    """EL_n given the greedy continuation of every prefix length t = 1..T-n. None when T <= n."""
    total = len(ids)
    if total <= n:
        return None
    return sum(overlap(continuations[t], ids[t:], n) for t in range(1, total - n + 1)) / (total - n)


def divergence_points(scores: TokenScores, last_prefix: int) -> list[int]:
    """Prefix lengths s whose continuation must really be decoded to cover prefixes 1..last_prefix."""
    ids, total = scores.ids, scores.n_tokens
    needed, next_divergence = set(), total
    for s in range(total - 1, 0, -1):
        if scores.greedy[s - 1] != ids[s]:
            next_divergence = s
        if s <= last_prefix and next_divergence < total:
            needed.add(next_divergence)
    return sorted(needed)


def assemble(ids: list[int], greedy: list[int], decoded: dict[int, list[int]],
             last_prefix: int) -> dict[int, list[int]]:
    """Continuations of prefixes 1..last_prefix from the decoded divergence points, back to front."""
    total = len(ids)
    continuation: list[int] = []  # continuation of the prefix of length s, built for s = T-1 down to 1
    result = {}
    for s in range(total - 1, 0, -1):
        # A divergence point that was not decoded lies beyond a decoded one that every prefix we need
        # reaches first, so its placeholder never shows in a result.
        continuation = decoded.get(s, []) if greedy[s - 1] != ids[s] else [ids[s], *continuation]
        if s <= last_prefix:
            result[s] = continuation
    return result


# Decoding batches hold this many times the sequences of a scoring batch: a one-token decoding step costs
# little per row, so the fixed cost of a step (every layer's launch, the weights read once) is shared by more
# rows. Measured on the demo's EL after unlearning (2 CPU threads): 16 rows 33 s, 64 rows 21 s, 128 rows 26 s.
DECODE_BATCH_FACTOR = 8


def greedy_choice(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().argmax(-1)  # the first maximum: ties go to the lowest token id


@torch.no_grad()
def greedy_continue(model, prompts: list[list[int]], new_tokens: list[int], runtime: Runtime, batch_size: int,
                    pad_id: int) -> list[list[int]]:
    """Greedy continuation of each prompt by its own number of new tokens, decoded in batches."""
    return continue_prompts(model, prompts, new_tokens, runtime, batch_size, pad_id, greedy_choice)


@torch.no_grad()
def continue_prompts(model, prompts: list[list[int]], new_tokens: list[int], runtime: Runtime, batch_size: int,
                     pad_id: int, choose: Callable[[torch.Tensor], torch.Tensor]) -> list[list[int]]:
    """Continue each prompt by its own number of new tokens; `choose` maps next-token logits (rows, V) to the
    chosen tokens (greedy, or a sampler).

    Prompts are left-padded; position ids follow each prompt's real length so padding changes nothing.
    Prompts needing a similar number of tokens share a batch, so few decoding steps are wasted.
    """
    outputs: list[list[int]] = [[] for _ in prompts]
    last_only = last_logits_only(model)
    context = context_length(model.config) if getattr(model, "config", None) is not None else None
    order = sorted(range(len(prompts)), key=lambda i: (-new_tokens[i], -len(prompts[i])))
    order = [i for i in order if new_tokens[i] > 0]
    # One autocast region for all decoding: autocast caches its bf16 copies of the weights only within a
    # region, and re-casting every weight for each one-token step would cost more than the step itself.
    with runtime.autocast():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            input_ids, mask = pad([prompts[i] for i in rows], pad_id, left=True, device=runtime.device)
            positions = (mask.cumsum(-1) - 1).clamp_min(0)
            past = None
            for _ in range(max(new_tokens[i] for i in rows)):
                out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                            past_key_values=past, use_cache=True, **last_only)
                past = out.past_key_values
                next_tokens = choose(out.logits[:, -1])
                for row, index in enumerate(rows):
                    if len(outputs[index]) < new_tokens[index]:
                        outputs[index].append(int(next_tokens[row]))
                input_ids = next_tokens[:, None]
                positions = positions[:, -1:] + 1
                if context is not None:  # a row with all its tokens steps on with the batch: within the context
                    positions = positions.clamp_max(context - 1)
                mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=-1)
    return outputs


def last_logits_only(model) -> dict:
    """Forward options that compute the logits of the last position only (prefill of a long prompt batch: the
    vocabulary projection of every other position is wasted), for models whose forward takes them."""
    forward = getattr(model, "forward", None)
    parameters = inspect.signature(forward).parameters if forward is not None else {}
    return {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}


def extraction_likelihoods(model, scores: list[TokenScores], ns: list[int], runtime: Runtime,
                           batch_size: int = 16, pad_id: int = 0) -> list[dict[str, float | None]]:
    """EL_n for every sequence and every n in `ns`, exactly as the per-prefix reference computes it."""
    if not ns:
        return [{} for _ in scores]
    last_prefix = [max(s.n_tokens - min(ns), 0) for s in scores]
    jobs = [(k, p) for k, s in enumerate(scores) for p in divergence_points(s, last_prefix[k])]
    # A divergence point s continues with the model's own guess, then decodes T-s-1 more tokens.
    prompts = [[*scores[k].ids[:p], int(scores[k].greedy[p - 1])] for k, p in jobs]
    new_tokens = [scores[k].n_tokens - p - 1 for k, p in jobs]
    decoded_tails = greedy_continue(model, prompts, new_tokens, runtime, batch_size, pad_id)
    decoded: list[dict[int, list[int]]] = [{} for _ in scores]
    for (k, p), prompt, tail in zip(jobs, prompts, decoded_tails, strict=True):
        decoded[k][p] = [prompt[-1], *tail]
    results = []
    for k, s in enumerate(scores):
        continuations = assemble(s.ids, [int(g) for g in s.greedy], decoded[k], last_prefix[k])
        results.append({str(n): el_from_continuations(s.ids, continuations, n) for n in ns})
    return results


@torch.no_grad()
def reference_extraction_likelihoods(model, ids: list[int], ns: list[int], runtime: Runtime) -> dict[str, float | None]:
    """The per-prefix reference: one greedy `generate` call for every prefix (slow; for tests and benchmarks)."""
    from transformers import GenerationConfig

    total = len(ids)
    # EOS is switched off: the continuation runs to length T whatever the model predicts.
    config = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0, bos_token_id=None)
    continuations = {}
    for t in range(1, total - min(ns) + 1):
        prompt = torch.tensor([ids[:t]], device=runtime.device)
        config.max_new_tokens = config.min_new_tokens = total - t
        with runtime.autocast():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config)
        continuations[t] = out[0, t:].tolist()
    return {str(n): el_from_continuations(ids, continuations, n) for n in ns}
