"""Adversarial prefix attack: a greedy coordinate gradient (GCG) search for tokens that bring a suffix back.

Zou et al. (2023) search token space for a short prompt that makes a model produce a target; here the target
is a sequence's own suffix. Each sequence x_1..x_T is split as for `verbatim`: P = min(prefix_tokens, T // 2),
prompt x_1..x_P, suffix x_{P+1}..x_T. The input under an adversarial prefix A = a_1..a_n (`gcg_tokens`) is

    A + x_1..x_P + x_{P+1}..x_T        (x_1 stays first when it is the tokenizer's BOS: x_1 + A + x_2..)

and the search minimises the teacher-forced suffix loss L(A) = -1/(T-P) sum_{t>P} log p(x_t | A, x_<t):

    A = n copies of "!" (its one token; else the lowest ordinary token id)
    repeat `gcg_steps` times:
        G = dL/dE, E the one-hot (n, V) of A                              (one forward and backward pass)
        top_i = the `gcg_top_k` tokens v with the most negative G[i, v]   (special tokens never)
        draw `gcg_candidates` (position i, token from top_i) swaps, uniformly, seeded
        score every candidate A' (A with one token swapped) in one batched teacher-forced pass
        A = the best A' if L(A') < L(A)

So L never rises. A is token ids, fed to the model as ids (an attacker with the weights needs no text that
tokenizes to them). Sequences are searched side by side, a batch of them per pass. The gradient is the
unwrapped model's (a decoding guard rewrites the output from token ids, there is no gradient through it); every
loss that decides, and every measure, is of the measured model `wrap(model)`.

Under the A found, the suffix is measured as the prefix attack measures it: MA = the share of suffix tokens
x_{P+1}..x_T that are the teacher-forced argmax (the audit's MA restricted to the suffix positions), verbatim =
all of them are, which is exactly "greedy decoding after A + x_1..x_P reproduces the suffix" (each greedy step
sees the context teacher forcing gives it as long as every earlier step was right). The control is the same
search, same budget and seed, on a seeded subset of the holdout (`holdout_control` sequences): the band of the
attacked suffix MA is calibrated on the holdout's attacked suffix MA with the audit's band rule, so a prefix
that lifts unseen text as much is no evidence. A forget sequence is returned when its attacked MA is above that
band (resp. verbatim), the baseline audit's was not, and it was not so already under the initial A (status_before
below: the suffix measure, not the search, at work). Each row also has the prefix found (token ids),
loss_before / ma_before (under the initial A), the loss after each step and loss_after, and status_before: the
status of ma_before against the band of the control's ma_before (extractable there is the suffix measure, not the
search, at work).

Cost: a gradient is about 3 forward passes, so every attacked sequence (forget and control) costs about
1 + steps * (candidates + 3) forward passes of T + n tokens: 46 with the default budget (5 steps, 6 candidates).
On the demo (12 forget + 20 control records of 40-70 tokens, SmolLM2-135M) that is about 90k tokens: about
4 minutes on one busy CPU thread at ~390 tokens/s, 2 minutes or so on two free cores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...errors import InputError
from ...io.tokens import length_batches, pad, token_limit
from ...measure.band import EXTRACTABLE, calibrate
from ...measure.scoring import LeanScores, lean_scores
from .common import AttackContext, counts, sequence_row


@dataclass(frozen=True)
class Target:
    """A sequence split for the attack: the input under prefix A is head + A + prompt + suffix."""

    head: list[int]  # the tokenizer's BOS, when it puts one first
    prompt: list[int]  # x_1..x_P after the head (its first tokens give way when A would overflow the context)
    suffix: list[int]  # x_{P+1}..x_T

    def ids(self, adversarial: list[int]) -> list[int]:
        return [*self.head, *adversarial, *self.prompt, *self.suffix]

    def loss(self, scores: LeanScores) -> float:
        """Mean negative log-likelihood of the suffix tokens (the last len(suffix) scored tokens)."""
        return float(-scores.logprobs[-len(self.suffix) :].mean())

    def hits(self, scores: LeanScores) -> np.ndarray:
        return scores.hits[-len(self.suffix) :]


def make_target(ids: list[int], tokenizer, prefix_tokens: int, n: int) -> Target:
    p = min(prefix_tokens, len(ids) // 2)
    lead = int(tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id)
    excess = len(ids) + n - token_limit(tokenizer, len(ids) + n)
    return Target(ids[:lead], ids[lead:p][excess:], ids[p:])


def allowed_tokens(tokenizer, vocab: int) -> torch.Tensor:
    """(vocab,) bool: the ids a prefix may use: the tokenizer's own (not the embedding's padding rows), not special."""
    allowed = torch.zeros(vocab, dtype=torch.bool)
    allowed[: min(len(tokenizer), vocab)] = True
    allowed[[i for i in tokenizer.all_special_ids if i < vocab]] = False
    return allowed


def first_token(tokenizer, allowed: torch.Tensor) -> int:
    """The token A starts as: "!" when it is one allowed token, else the lowest allowed id."""
    ids = tokenizer("!", add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 and allowed[ids[0]] else int(allowed.nonzero()[0])


def evaluate(ctx: AttackContext, targets: list[Target], prefixes: torch.Tensor, owners: list[int]) -> list[LeanScores]:
    """Teacher-forced scores of targets[owners[r]] under prefixes[r], batched as the audit batches."""
    inputs = [targets[o].ids(a) for o, a in zip(owners, prefixes.tolist(), strict=True)]
    with ctx.runtime.autocast():
        return lean_scores(ctx.wrap(ctx.model), inputs, ctx.runtime, ctx.audit_settings.batch_size, ctx.pad_id)


def gradient(ctx: AttackContext, targets: list[Target], prefixes: torch.Tensor) -> torch.Tensor:
    """d(sum over rows of the suffix loss) / d(one-hot of each row's prefix), shape (rows, n, V).

    Only the one-hot gets a gradient (torch.autograd.grad): no parameter's .grad is touched."""
    model, device = ctx.model, ctx.runtime.device
    inputs = [t.ids(a) for t, a in zip(targets, prefixes.tolist(), strict=True)]
    input_ids, mask = pad(inputs, ctx.pad_id, device=device)
    embedding = model.get_input_embeddings()
    one_hot = torch.nn.functional.one_hot(prefixes.to(device), embedding.weight.shape[0])
    one_hot = one_hot.to(embedding.weight.dtype).requires_grad_()
    direct = one_hot @ embedding.weight
    with torch.no_grad():
        embeds = embedding(input_ids)
    rows = torch.arange(len(targets), device=device)[:, None]
    slots = torch.tensor([len(t.head) for t in targets], device=device)[:, None] + torch.arange(
        prefixes.shape[1], device=device)
    # The embedding module's own values (some scale them) plus zero that carries the gradient of one_hot @ W:
    # a constant scale would not change the gradient's ranking of the tokens.
    embeds = embeds.index_put((rows, slots), (direct - direct.detach()).to(embeds.dtype), accumulate=True)
    weights = torch.zeros(input_ids.shape[0], input_ids.shape[1] - 1, device=device)
    for row, (ids, target) in enumerate(zip(inputs, targets, strict=True)):  # weights[r, j] scores token j + 1
        weights[row, len(ids) - len(target.suffix) - 1 : len(ids) - 1] = 1 / len(target.suffix)
    with ctx.runtime.autocast():
        logits = model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits[:, :-1]
    suffix = weights > 0  # normalized over the vocabulary at the suffix positions only
    logprobs = torch.log_softmax(logits[suffix].float(), dim=-1).gather(-1, input_ids[:, 1:][suffix, None])
    (grad,) = torch.autograd.grad(-(logprobs.squeeze(-1) * weights[suffix]).sum(), one_hot)
    return grad


def search(ctx: AttackContext, targets: list[Target], start: int, allowed: torch.Tensor,
           generator: torch.Generator) -> list[dict]:
    """GCG on every target side by side (the module's algorithm); per target the prefix found and its measures."""
    s = ctx.settings
    rows, n, k, c = len(targets), s.gcg_tokens, min(s.gcg_top_k, int(allowed.sum())), s.gcg_candidates
    blocked = ~allowed.to(ctx.runtime.device)
    current = torch.full((rows, n), start, dtype=torch.long)
    scores = evaluate(ctx, targets, current, list(range(rows)))
    first = list(scores)
    loss = np.array([t.loss(sc) for t, sc in zip(targets, scores, strict=True)])
    history = [loss.copy()]  # the suffix loss of every target before the search and after each step
    for _ in range(s.gcg_steps):
        grad = gradient(ctx, targets, current).float().masked_fill(blocked, float("inf"))
        top = grad.topk(k, dim=-1, largest=False).indices.cpu()  # (rows, n, k): most negative gradient first
        positions = torch.randint(n, (rows, c), generator=generator)
        tokens = top[torch.arange(rows)[:, None], positions, torch.randint(k, (rows, c), generator=generator)]
        candidates = current[:, None, :].repeat(1, c, 1).scatter_(2, positions[..., None], tokens[..., None])
        owners = [r for r in range(rows) for _ in range(c)]
        tried = evaluate(ctx, targets, candidates.reshape(rows * c, n), owners)
        losses = np.array([targets[o].loss(sc) for o, sc in zip(owners, tried, strict=True)]).reshape(rows, c)
        for r in np.flatnonzero(losses.min(1) < loss):
            best = int(losses[r].argmin())
            current[r], scores[r], loss[r] = candidates[r, best], tried[r * c + best], losses[r, best]
        history.append(loss.copy())
    steps = np.stack(history, axis=1).tolist()  # (rows, 1 + steps)
    return [{"prefix_ids": a, "loss_before": trajectory[0], "loss_after": trajectory[-1], "losses": trajectory[1:],
             "ma_before": float(t.hits(before).mean()), "ma": float(t.hits(after).mean()),
             "verbatim": bool(t.hits(after).all()), "prefix_tokens": len(t.head) + len(t.prompt),
             "suffix_tokens": len(t.suffix)}
            for t, a, before, after, trajectory in zip(targets, current.tolist(), first, scores, steps, strict=True)]


def search_all(ctx: AttackContext, token_lists: list[list[int]]) -> list[dict]:
    """`search` on every sequence, a scoring batch of similar length at a time, one seeded generator for all."""
    s = ctx.settings
    vocab = ctx.model.get_input_embeddings().weight.shape[0]
    allowed = allowed_tokens(ctx.tokenizer, vocab)
    start = first_token(ctx.tokenizer, allowed)
    targets = [make_target(ids, ctx.tokenizer, ctx.audit_settings.prefix_tokens, s.gcg_tokens) for ids in token_lists]
    generator = torch.Generator().manual_seed(s.seed)
    results: list[dict] = [{} for _ in targets]
    for batch in length_batches(token_lists, ctx.audit_settings.batch_size):
        for index, found in zip(batch, search(ctx, [targets[i] for i in batch], start, allowed, generator),
                                strict=True):
            results[index] = found
    return results


def gcg_attack(ctx: AttackContext) -> dict:
    s = ctx.settings
    forget, holdout = ctx.sets["forget"], ctx.sets["holdout"]
    rng = np.random.default_rng(s.seed)
    chosen = sorted(rng.permutation(len(holdout))[: s.holdout_control].tolist())
    if not chosen:
        raise InputError("the adversarial_prefix attack calibrates its band on a holdout control: "
                         "--holdout-control must be at least 1")
    found = search_all(ctx, ctx.encode(forget, "forget") + ctx.encode([holdout[i] for i in chosen], "holdout"))
    mine, control = found[: len(forget)], found[len(forget) :]
    band = calibrate(ctx.audit_settings.band, [r["ma"] for r in control])
    before = calibrate(ctx.audit_settings.band, [r["ma_before"] for r in control])
    rows = [sequence_row(ctx, seq, band.status(r["ma"]), **r, status_before=before.status(r["ma_before"]))
            for seq, r in zip(forget, mine, strict=True)]
    for row in rows:  # returned: made so by the search, not already so under the initial prefix
        row["returned_extractable"] &= row["status_before"] != EXTRACTABLE
        row["returned_verbatim"] &= row["ma_before"] < 1
    budget = {"tokens": s.gcg_tokens, "steps": s.gcg_steps, "candidates": s.gcg_candidates, "top_k": s.gcg_top_k,
              "seed": s.seed}
    return {
        "description": f"GCG search (Zou et al. 2023) per sequence for {s.gcg_tokens} adversarial prefix tokens "
                       f"before the verbatim prefix that minimise the suffix loss: {s.gcg_steps} steps of "
                       f"{s.gcg_candidates} single-token swaps drawn from the top {s.gcg_top_k} tokens of the "
                       f"one-hot gradient per position (seed {s.seed}); a swap is kept only if it lowers the loss. "
                       "ma = teacher-forced argmax accuracy over the suffix tokens under the prefix found; "
                       "verbatim = all of them right (greedy decoding reproduces the suffix). The band is "
                       "calibrated on the same search over a seeded holdout subset (`control`: its attacked suffix "
                       "MA). status_before: the same measure under the initial prefix, against band_before (the "
                       "control's); a sequence extractable (or verbatim) there was not made so by the search and "
                       "is not counted as returned. prefix_ids are token ids (never text).",
        "settings": {**budget, "holdout_control": len(chosen), "prefix_tokens": ctx.audit_settings.prefix_tokens,
                     "band": ctx.audit_settings.band},
        **counts(rows),
        "band": band.to_json(),
        "band_before": before.to_json(),
        "forget_mean_ma": float(np.mean([r["ma"] for r in mine])),
        "forget_mean_ma_before": float(np.mean([r["ma_before"] for r in mine])),
        "holdout_n": len(control),
        "holdout_mean_ma": float(np.mean([r["ma"] for r in control])),
        "holdout_mean_ma_before": float(np.mean([r["ma_before"] for r in control])),
        "holdout_verbatim": sum(r["verbatim"] for r in control),
        "control": [{"id": seq.id, "hash": seq.short_hash, **r}
                    for seq, r in zip((holdout[i] for i in chosen), control, strict=True)],
        "sequences": rows,
    }
