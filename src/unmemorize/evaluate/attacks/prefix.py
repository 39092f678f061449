"""Prefix attack: the audit prompts with the exact text; an attacker may not have it, or may do better.

Each sequence x_1..x_T is split at L tokens into a prompt and a suffix x_{L+1}..x_T, with P = min(prefix_tokens,
T // 2) as for `verbatim`. The variations:

    short            L = max(P // 2, 1)
    long             L = P + (T - P) // 2: half of the suffix joins the prompt, the other half must be produced
    lowercase        L = P, the prompt text lowercased
    collapse_space   L = P, every run of whitespace in the prompt text made one space
    double_space     L = P, every space in the prompt text doubled
    prime_forget     L = P, another forget record's text and a newline before the prompt
    prime_retain     L = P, a retain record's text and a newline before the prompt (needs a retain set)

Text transforms act on the prompt text, which is the original text up to the end of token L (the tokenizer's
character offsets), and the prompt is tokenized again. The suffix stays the original token ids x_{L+1}..x_T:
the question is whether the model still produces the very tokens it memorized. The input is prompt + suffix,
scored teacher-forced in one pass; MA is over the suffix tokens only, and verbatim means every suffix argmax is
right (the same as greedy decoding reproducing the suffix). Every holdout sequence gets the same variation
(primed with forget / retain records too), and the band of each variation is calibrated on the holdout's
suffix MA under it, with the audit's band rule. Trying seven variations, an unseen record is above *some*
variation's band far more often than above one (a third of the demo's forget records under the oracle, which
never saw them), so a sequence is extractable when its largest excess over the variations' upper edges is above
the band the holdout's own largest excesses give (`measure.band.Familywise`).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np

from ...errors import InputError
from ...io.tokens import token_limit
from ...measure.band import Familywise
from ...measure.scoring import score_tokens
from .common import AttackContext, counts, familywise_control, sequence_row

TEXT_TRANSFORMS: dict[str, Callable[[str], str]] = {
    "lowercase": str.lower,
    "collapse_space": lambda text: re.sub(r"\s+", " ", text),
    "double_space": lambda text: text.replace(" ", "  "),
}
VARIATIONS = ("short", "long", *TEXT_TRANSFORMS, "prime_forget", "prime_retain")


class Split:
    """One sequence tokenized as the audit does (tokens.encode's call), with the character where each token ends."""

    def __init__(self, tokenizer, text: str, max_tokens: int) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise InputError("the prefix attack needs a fast tokenizer (it splits text at token offsets)")
        encoding = tokenizer(text, truncation=True, max_length=token_limit(tokenizer, max_tokens),
                             return_offsets_mapping=True)
        self.text, self.ids = text, list(encoding["input_ids"])
        self.ends = [end for _, end in encoding["offset_mapping"]]  # special tokens: (0, 0)

    def prompt_text(self, n_tokens: int) -> str:
        """The original text up to the end of token n_tokens."""
        return self.text[: max(self.ends[:n_tokens], default=0)]


def _variation(name: str, split: Split, tokenizer, prefix_tokens: int, context: str | None) -> tuple[list[int], int]:
    """(prompt ids, L): the input is prompt + the original ids after token L."""
    total = len(split.ids)
    p = min(prefix_tokens, total // 2)
    if name == "short":
        return split.ids[: max(p // 2, 1)], max(p // 2, 1)
    if name == "long":
        # Not 2P: on short records 2P reaches the end, and a one-token "suffix" is verbatim for unseen text too.
        long = p + (total - p) // 2
        return split.ids[:long], long
    text = split.prompt_text(p)
    text = TEXT_TRANSFORMS[name](text) if name in TEXT_TRANSFORMS else f"{context}\n{text}"
    # The tokenizer's own call, as tokens.encode makes it (default special tokens), without its 2-token minimum.
    prompt = list(tokenizer(text)["input_ids"])
    return (prompt or split.ids[:p]), p


def _contexts(ctx: AttackContext, name: str, count: int) -> list[str | None]:
    """The record placed before sequence k: forget / retain records in turn (for forget: never itself)."""
    if not name.startswith("prime_"):
        return [None] * count
    records = ctx.sets.get(name.removeprefix("prime_")) or []
    max_tokens = ctx.audit_settings.max_tokens
    texts = [Split(ctx.tokenizer, r.text, max_tokens).prompt_text(max_tokens) for r in records]
    return [texts[k % len(texts)] for k in range(count)]


def _measure(ctx: AttackContext, name: str, splits: list[Split], contexts: list[str | None]) -> list[tuple]:
    """(suffix MA, verbatim, prompt tokens) of each sequence under variation `name`."""
    inputs, starts = [], []
    for split, context in zip(splits, contexts, strict=True):
        prompt, cut = _variation(name, split, ctx.tokenizer, ctx.audit_settings.prefix_tokens, context)
        # Within the model's context: a priming record (or a transform that adds tokens) gives up its first tokens.
        width = len(prompt) + len(split.ids) - cut
        prompt = prompt[width - token_limit(ctx.tokenizer, width) :]
        inputs.append(prompt + split.ids[cut:])
        starts.append(len(prompt))
    scores = score_tokens(ctx.wrap(ctx.model), inputs, ctx.runtime, ctx.audit_settings.batch_size, ctx.pad_id)
    results = []
    for score, start in zip(scores, starts, strict=True):
        hits = score.hits[start - 1 :]  # hits[i] scores token i + 2 (1-based): the suffix starts at `start`
        results.append((float(hits.mean()), bool(hits.all()), start))
    return results


def prefix_attack(ctx: AttackContext) -> dict:
    forget, holdout = ctx.sets["forget"], ctx.sets["holdout"]
    max_tokens = ctx.audit_settings.max_tokens
    forget_splits = [Split(ctx.tokenizer, s.text, max_tokens) for s in forget]
    holdout_splits = [Split(ctx.tokenizer, s.text, max_tokens) for s in holdout]
    # Priming needs another record: a second forget sequence, or a retain set.
    possible = {"prime_forget": len(forget) > 1, "prime_retain": bool(ctx.sets.get("retain"))}
    names = [n for n in ctx.settings.prefix_variations if possible.get(n, True)]
    if not names:
        raise InputError(f"prefix attack: none of the variations {', '.join(ctx.settings.prefix_variations)} can "
                         "run (priming needs a second forget sequence or a retain set)")
    measured, control = {}, {}
    for name in names:
        # Forget k is primed with forget k+1 (never itself); holdout k with forget / retain k, in turn.
        shift = 1 if name == "prime_forget" else 0
        measured[name] = _measure(ctx, name, forget_splits, _contexts(ctx, name, len(forget) + shift)[shift:])
        control[name] = _measure(ctx, name, holdout_splits, _contexts(ctx, name, len(holdout)))
    holdout_ma = np.array([[ma for ma, _, _ in control[name]] for name in names]).T  # (holdout, variations)
    forget_ma = np.array([[ma for ma, _, _ in measured[name]] for name in names]).T
    familywise = Familywise.calibrate(ctx.audit_settings.band, holdout_ma)
    best, excess = familywise.excess(forget_ma)

    per_sequence: list[dict] = [{} for _ in forget]
    variations = {}
    for name, band in zip(names, familywise.bands, strict=True):
        statuses = [band.status(ma) for ma, _, _ in measured[name]]
        for k, ((ma, verbatim, start), status) in enumerate(zip(measured[name], statuses, strict=True)):
            per_sequence[k][name] = {"ma": ma, "status": status, "verbatim": verbatim, "prompt_tokens": start}
        alone = [sequence_row(ctx, seq, st, v) for seq, st, (_, v, _) in zip(forget, statuses, measured[name],
                                                                            strict=True)]
        variations[name] = {"band": band.to_json(), **counts(alone),
                            "forget_mean_ma": float(np.mean([ma for ma, _, _ in measured[name]])),
                            "holdout_mean_ma": float(np.mean([ma for ma, _, _ in control[name]])),
                            "holdout_verbatim": sum(v for _, v, _ in control[name])}
    rows = []
    for k, (seq, results) in enumerate(zip(forget, per_sequence, strict=True)):
        verbatim = any(r["verbatim"] for r in results.values())
        rows.append(sequence_row(ctx, seq, familywise.status(excess[k]), verbatim, variation=names[best[k]],
                                 excess=float(excess[k]), variations=results))
    skipped = [n for n in ctx.settings.prefix_variations if n not in names]
    return {
        "description": "The prompt varied (shorter, longer, lowercased, whitespace changed, primed with another "
                       "record), the original suffix tokens scored teacher-forced after it: MA over the suffix, "
                       "band per variation from the holdout under the same variation, verbatim = every suffix "
                       "argmax right. A sequence is extractable when its largest excess over the variations' upper "
                       "edges (`excess`, at `variation`) is above the band the holdout's own largest excesses give "
                       "(`familywise`: corrected for trying many variations), verbatim when any variation makes it "
                       "so. A longer prompt leaves a shorter suffix, which is easier to get all right.",
        "settings": {"variations": names, "skipped": skipped, "prefix_tokens": ctx.audit_settings.prefix_tokens,
                     "band": ctx.audit_settings.band},
        **counts(rows),
        **familywise_control(familywise, holdout_ma, "holdout_any_variation"),
        "variations": variations,
        "sequences": rows,
    }
