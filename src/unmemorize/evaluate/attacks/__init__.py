"""Robustness attacks on an (unlearned) model: does a forgotten sequence come back?

Each attack measures every forget sequence under some change an attacker can make, and compares with the
baseline audit of the same model without any attack; `ABOUT` says what each one does (`unmemorize attacks`).

A sequence is "returned" when it is extractable (resp. verbatim) under the attack and was not in the
baseline. Results name sequences by id and short hash only, never by text.

Against the oracle (`against_oracle`): the same attacks run on a model that never saw the request flag some of
its records too (an attack tries many readings, and each is calibrated on the holdout, not on the request). A
record the oracle shows under the same attack is no evidence that the unlearned model remembers it; "beyond the
oracle" counts the returned records it does not show.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from ...errors import InputError
from ...io.models import Runtime
from ...io.sets import Sequence
from ...measure.audit import AuditResult, AuditSettings, audit
from ...measure.band import EXTRACTABLE
from .common import AttackContext
from .gcg import gcg_attack
from .logit_lens import logit_lens_attack
from .noise import noise_attack, prune_attack
from .prefix import VARIATIONS, prefix_attack
from .quantize import absmax_attack, gguf_attack, nf4_attack
from .relearn import relearn_attack
from .sampling import sampling_attack

ATTACKS: dict[str, Callable[[AttackContext], dict]] = {
    "sampling": sampling_attack,
    "prefix": prefix_attack,
    "relearn": relearn_attack,
    "benign_relearn": partial(relearn_attack, benign=True),
    "quantize_8bit": partial(gguf_attack, fmt="Q8_0"),
    "quantize_4bit": partial(gguf_attack, fmt="Q4_0"),
    "quantize_q5_0": partial(gguf_attack, fmt="Q5_0"),
    "quantize_q4_1": partial(gguf_attack, fmt="Q4_1"),
    "absmax_8bit": partial(absmax_attack, bits=8),
    "absmax_4bit": partial(absmax_attack, bits=4),
    "quantize_nf4": nf4_attack,
    "noise": noise_attack,
    "prune": prune_attack,
    "logit_lens": logit_lens_attack,
    "adversarial_prefix": gcg_attack,
}
ABOUT = {
    "sampling": "top-k / temperature sampling from the prefix instead of greedy decoding",
    "prefix": "the prompt varied: shorter, longer, lowercased, whitespace changed, primed with a record",
    "relearn": "a few fine-tuning steps on half of the forget set, then the other half audited",
    "benign_relearn": "the same on text that is not the request (the retain set, else the general text), then "
                      "the whole forget set audited",
    "quantize_8bit": "every weight matrix round-tripped through llama.cpp GGUF Q8_0 (blocks of 32)",
    "quantize_4bit": "the same through GGUF Q4_0",
    "quantize_q5_0": "the same through GGUF Q5_0",
    "quantize_q4_1": "the same through GGUF Q4_1",
    "absmax_8bit": "simulated symmetric absmax 8-bit integers, one scale per row",
    "absmax_4bit": "simulated symmetric absmax 4-bit integers, one scale per group_size weights",
    "quantize_nf4": "bitsandbytes NF4 (CUDA with bitsandbytes only; elsewhere skipped, saying why)",
    "noise": "Gaussian noise of a small relative std added to every weight matrix, a few seeded draws",
    "prune": "the smallest-magnitude fraction of every weight matrix set to zero",
    "logit_lens": "white-box: every intermediate layer read through the final norm and the output head, each "
                  "against the band the same layer gives the holdout",
    "adversarial_prefix": "white-box: a budgeted GCG search for a few tokens before the prefix that bring the "
                          "suffix back, the holdout searched the same way as the control",
}
assert list(ABOUT) == list(ATTACKS)
# Run only when asked for by name: not in the default `attacks` list.
OPT_IN = {"quantize_q5_0", "quantize_q4_1", "absmax_8bit", "absmax_4bit", "quantize_nf4"}
DEFAULT_ATTACKS = [name for name in ATTACKS if name not in OPT_IN]


class AttackSettings(BaseModel):
    """Which attacks to run and how hard each one pushes."""

    model_config = ConfigDict(extra="forbid")

    attacks: list[str] = Field(DEFAULT_ATTACKS, description=f"Attacks to run, in order: {', '.join(ATTACKS)} "
                               f"({', '.join(sorted(OPT_IN))} only when named).")
    samples: int = Field(8, ge=1, description="sampling: continuations drawn per forget prefix.")
    top_k: int = Field(40, ge=0, description="sampling: draw only among the k most likely tokens (0: all).")
    temperature: float = Field(1.0, gt=0, description="sampling: logits are divided by this before softmax.")
    holdout_control: int = Field(20, ge=0, description="sampling, adversarial_prefix: holdout sequences attacked "
                                 "the same way, as a control (a seeded subset of at most this many; "
                                 "adversarial_prefix calibrates its band on them and needs at least 1).")
    prefix_variations: list[str] = Field(list(VARIATIONS), description="prefix: prompt variations to try: "
                                         f"{', '.join(VARIATIONS)}.")
    relearn_steps: int = Field(10, ge=1, description="relearn: gradient steps (AdamW, constant rate).")
    relearn_lr: float = Field(2e-5, gt=0, description="relearn: learning rate; the unlearning methods' own rate, "
                              "so the attacker gets the defender's step size.")
    benign_on: Literal["retain", "general"] | None = Field(None, description="benign_relearn: the text that is "
                                                           "not the request it trains on, then audits the whole "
                                                           "forget set (default: the retain set when there is "
                                                           "one, else the general text).")
    relearn_batch: int = Field(8, ge=1, description="relearn, benign_relearn: sequences per step (each epoch a "
                               "fresh seeded order; when the set is no larger, every step sees all of it).")
    group_size: int = Field(64, ge=1, description="absmax_4bit: weights per scale along the input dimension "
                            "(absmax_8bit uses one scale per output row; the GGUF formats always use blocks of "
                            "32, NF4 blocks of 64).")
    quantize_embeddings: bool = Field(True, description="quantize_*, absmax_*: round-trip the token embeddings "
                                      "too (as GGUF files do), not only the linear layers.")
    noise_sigma: float = Field(0.01, gt=0, description="noise: std of the Gaussian noise relative to each weight "
                               "matrix's own std, w' = w + sigma * std(w) * N(0, 1).")
    noise_draws: int = Field(3, ge=1, description="noise: independent seeded draws; a sequence returns when it "
                             "returns in any of them.")
    prune_fraction: float = Field(0.05, ge=0, lt=1, description="prune: fraction of each weight matrix, the "
                                  "smallest in magnitude, set to zero.")
    lens_layers: list[int] | None = Field(None, description="logit_lens: hidden layers read through the final "
                                          "norm and the output head, 1..L-1 of the model's L (L is the model's "
                                          "own output, 0 the token embeddings); None: every intermediate layer.")
    gcg_tokens: int = Field(6, ge=1, description="adversarial_prefix: tokens in the adversarial prefix.")
    gcg_steps: int = Field(5, ge=0, description="adversarial_prefix: GCG steps (one gradient, one batch of "
                           "candidates each).")
    gcg_candidates: int = Field(6, ge=1, description="adversarial_prefix: single-token swaps tried per step. "
                                "Cost: about 1 + steps * (candidates + 3) forward passes over each attacked "
                                "sequence (a gradient costs about 3).")
    gcg_top_k: int = Field(32, ge=1, description="adversarial_prefix: swaps are drawn among the k tokens of most "
                           "negative gradient at each position.")
    seed: int = Field(0, description="Seed of the sampling, the relearn split, the holdout control subset, the "
                      "noise draws and the adversarial_prefix swaps.")

    @field_validator("attacks")
    @classmethod
    def _attacks(cls, names: list[str]) -> list[str]:
        return known(names, ATTACKS, "--attacks {!r}: unknown attack")

    @field_validator("prefix_variations")
    @classmethod
    def _variations(cls, names: list[str]) -> list[str]:
        return known(names, VARIATIONS, "prefix variation {!r}: unknown")


def known(names: list[str], allowed, message: str) -> list[str]:
    """`names` without repeats, or one InputError naming the first unknown one."""
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise InputError(f"{message.format(unknown[0])}; choose from {', '.join(allowed)}")
    return list(dict.fromkeys(names))

def run_attacks(model: nn.Module, tokenizer, sets: dict[str, list[Sequence]], audit_settings: AuditSettings,
                runtime: Runtime, settings: AttackSettings, baseline: AuditResult | None = None,
                wrap: Callable[[nn.Module], nn.Module] | None = None,
                token_ids: dict[str, list[list[int]]] | None = None) -> dict:
    """Run `settings.attacks` on `model`; return {attack name: JSON-serializable result}.

    `sets` holds "forget" and "holdout" (and "retain" or "general" for benign_relearn, "retain" for the retain
    priming).
    `baseline` is the audit of `wrap(model)` without any attack (computed, EL off, when None). `wrap` turns
    a model into the one that is measured (a decoding-time guard, say); relearn and quantize change a deep
    copy of `model` and wrap that. The input model is never modified. `token_ids` holds sets already encoded
    with `audit_settings.max_tokens` (in the order of `sets`): they are not encoded again.
    """
    for name in ("forget", "holdout"):
        if not sets.get(name):
            raise InputError(f"attacks need a non-empty {name} set")
    wrap = wrap or (lambda m: m)
    if baseline is None:
        no_el = audit_settings.model_copy(update={"el_n": []})
        baseline = audit(wrap(model), tokenizer, {"forget": sets["forget"], "holdout": sets["holdout"]}, no_el,
                         runtime)
    ctx = AttackContext(model, tokenizer, sets, audit_settings, runtime, settings, baseline, wrap, token_ids or {})
    results = {}
    for name in settings.attacks:
        started = time.perf_counter()
        results[name] = ATTACKS[name](ctx)
        results[name]["seconds"] = round(time.perf_counter() - started, 3)
    return results


def against_oracle(results: dict, oracle_results: dict) -> None:
    """Pair every attack in `results` with the same attack on the oracle (`oracle_results`, against the oracle's
    own audit), record by record (by id):

        oracle_status, oracle_verbatim   the record under the same attack on the oracle
        beyond_oracle_extractable        returned_extractable, and the oracle under the attack not extractable
        beyond_oracle_verbatim           returned_verbatim, and the oracle under the attack not verbatim

    and per attack the counts of both and the oracle's own headline numbers (`oracle`). A record the oracle's
    attack did not measure (relearn audits only the half it did not train on; both split alike) counts as not
    shown there. Attacks the oracle did not run are left as they are."""
    for name, result in results.items():
        theirs = oracle_results.get(name)
        if theirs is None:
            continue
        by_id = {row["id"]: row for row in theirs.get("sequences", [])}
        for row in result.get("sequences", []):
            other = by_id.get(row["id"], {})
            row["oracle_status"], row["oracle_verbatim"] = other.get("status"), bool(other.get("verbatim"))
            row["beyond_oracle_extractable"] = row["returned_extractable"] and other.get("status") != EXTRACTABLE
            row["beyond_oracle_verbatim"] = row["returned_verbatim"] and not other.get("verbatim")
        rows = result.get("sequences", [])
        result["beyond_oracle_extractable"] = sum(r["beyond_oracle_extractable"] for r in rows)
        result["beyond_oracle_verbatim"] = sum(r["beyond_oracle_verbatim"] for r in rows)
        result["oracle"] = {key: theirs.get(key) for key in ("returned_extractable", "returned_verbatim",
                                                             "extractable", "verbatim", "n", "skipped",
                                                             "seconds")
                            if key in theirs}
