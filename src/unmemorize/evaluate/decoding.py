"""Decoding-time unlearning baselines: the weights stay as they are; the next-token distribution is rewritten.

Each guard is an `nn.Module` around a causal LM. Its forward returns the wrapped model's output with `logits`
replaced by log p' (float32 log-probabilities of the guarded distribution), so the audit, the EL decoder and
`generate` measure a guarded model exactly as they measure any model.

- `dpd:LAMBDA`, private decoding (Majmudar et al. 2022; a baseline in Jang et al. 2023):

      p'(v | c) = (1 - LAMBDA) * p(v | c) + LAMBDA / V

  p' is an increasing function of p, so the argmax never moves: MA, verbatim and greedy EL are those of the
  unguarded model, by construction. Only what reads probabilities sees the change: loss, zlib, Min-K%,
  Min-K%++ and sampling. DPD does not stop greedy extraction at all.

- `filter:N`, an output guardrail: after context c, token v is blocked when (last N-1 real tokens of c) + v
  is an N-gram of some forget sequence:

      p'(v | c) = 0 if v is blocked, else p(v | c) / (1 - sum of p over the blocked tokens)

  Greedy decoding can then never complete a forget N-gram, so EL_n is 0 for n >= N and nothing is verbatim.
  The price shows in the audit: every forget token after the first N-1 is blocked under teacher forcing, so
  the forget MA falls far below unseen data (over_unlearned) and the forget loss explodes (a loss attack
  separates the forget set perfectly). Contexts shorter than N-1 tokens block nothing. If every token of the
  vocabulary were blocked, the distribution is left alone (decoding must emit something).

Input guards change what the model reads instead (`input_guards.py`): `icul:K` (in-context unlearning),
`guardrail[:TEXT]` (an instruction before every input) and `input_filter[:ngram|embed][:TAU]` (a refusal for
inputs that start like a forget sequence). Every guard leaves the weights as they are: it protects a deployment
that serves the model through it, not the weights (`DEPLOYMENT_NOTE`).
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InputError

DEFAULT_N = 4
# log 0 is -inf; this stand-in (exp underflows to exactly 0 in float32) keeps p * log p = 0 in the audit's
# entropy terms (Min-K%++) instead of nan, and the loss of a blocked token finite but enormous.
BLOCKED_LOGPROB = -1e4
USAGE = ("expected dpd:LAMBDA (0 <= LAMBDA < 1), filter[:N] (integer N >= 1, default 4), icul[:K] (integer K >= 0, "
         "default 2), guardrail[:TEXT] or input_filter[:ngram|embed][:TAU] (0 < TAU <= 1)")
DEFAULT_ICUL_K = 2
# input_filter thresholds. On the demo (first 32 tokens of each record, the shipped victim): the largest 4-gram
# overlap of an unseen record with a forget record is 0.45 (holdout), 0.38 (retain), 0.03 (general text), and
# the largest cosine of mean last-layer states 0.978 (holdout); a forget record's own prefix scores 1 on both.
DEFAULT_TAU = {"ngram": 0.6, "embed": 0.99}
DEPLOYMENT_NOTE = ("Input and decoding guards protect a deployment, not the weights: the weights are unchanged, and "
                   "anyone who has them (a white-box attacker, or a leaked checkpoint) runs the model without the "
                   "guard and gets every forget sequence back.")


@dataclass(frozen=True)
class DecodingSpec:
    kind: str  # "dpd" | "filter" | "icul" | "guardrail" | "input_filter"
    lam: float = 0.0  # dpd: weight of the uniform distribution
    n: int = DEFAULT_N  # filter: n-gram length (input_filter's n-grams have this length too)
    k: int = DEFAULT_ICUL_K  # icul: correctly continued examples
    text: str | None = None  # guardrail: the instruction (None: input_guards.DEFAULT_INSTRUCTION)
    measure: str = "ngram"  # input_filter: "ngram" | "embed"
    tau: float = DEFAULT_TAU["ngram"]  # input_filter: similarity at or above which the input is refused

    def __str__(self) -> str:
        if self.kind == "dpd":
            return f"dpd:{self.lam:g}"
        if self.kind == "icul":
            return f"icul:{self.k}"
        if self.kind == "guardrail":
            return "guardrail" if self.text is None else f"guardrail:{self.text}"
        if self.kind == "input_filter":
            return f"input_filter:{self.measure}:{self.tau:g}"
        return f"filter:{self.n}"

    @property
    def input_guard(self) -> bool:
        """Whether the guard acts on the input (the rest rewrite the output distribution)."""
        return self.kind in ("icul", "guardrail", "input_filter")


def parse_decoding(spec: str) -> DecodingSpec:
    """`dpd:LAMBDA`, `filter[:N]`, `icul[:K]`, `guardrail[:TEXT]` or `input_filter[:ngram|embed][:TAU]` (the CLI
    flag `--decoding`); anything else is an InputError."""
    kind, sep, value = spec.strip().partition(":")
    if kind in ("icul", "guardrail", "input_filter"):
        return _parse_input_guard(spec, kind, sep, value)
    if kind == "dpd":
        try:
            lam = float(value)
        except ValueError:
            raise InputError(f"--decoding {spec!r}: {USAGE}") from None
        if not 0 <= lam < 1:  # also rejects nan; at 1 the output is uniform noise and the argmax is token 0
            raise InputError(f"--decoding {spec!r}: LAMBDA must be in [0, 1), got {value}")
        return DecodingSpec("dpd", lam=lam)
    if kind == "filter":
        if not sep:
            return DecodingSpec("filter", n=DEFAULT_N)
        return DecodingSpec("filter", n=_whole(spec, value, "N", 1))
    raise InputError(f"--decoding {spec!r}: {USAGE}")


def _whole(spec: str, value: str, name: str, least: int) -> int:
    """The integer `value` of `spec`'s `name`, at least `least`; InputError otherwise."""
    try:
        number = int(value)
    except ValueError:
        raise InputError(f"--decoding {spec!r}: {USAGE}") from None
    if number < least:
        raise InputError(f"--decoding {spec!r}: {name} must be at least {least}, got {number}")
    return number


def _parse_input_guard(spec: str, kind: str, sep: str, value: str) -> DecodingSpec:
    if kind == "guardrail":
        if sep and not value.strip():
            raise InputError(f"--decoding {spec!r}: the guardrail's TEXT is empty (plain `guardrail` uses the default "
                             "instruction)")
        return DecodingSpec("guardrail", text=value.strip() if sep else None)
    if kind == "icul":
        if not sep:
            return DecodingSpec("icul")
        return DecodingSpec("icul", k=_whole(spec, value, "K", 0))
    parts = value.split(":") if sep else []
    measure = parts.pop(0) if parts and parts[0] in DEFAULT_TAU else "ngram"
    if len(parts) > 1 or (parts and not parts[0]):
        raise InputError(f"--decoding {spec!r}: {USAGE}")
    try:
        tau = float(parts[0]) if parts else DEFAULT_TAU[measure]
    except ValueError:
        raise InputError(f"--decoding {spec!r}: {USAGE}") from None
    if not 0 < tau <= 1:  # also rejects nan
        raise InputError(f"--decoding {spec!r}: TAU must be in (0, 1], got {parts[0]}")
    return DecodingSpec("input_filter", measure=measure, tau=tau)


def describe(spec: DecodingSpec) -> dict:
    """What a report must say about a guarded model."""
    common = {"decoding": str(spec), "kind": spec.kind, "weights_changed": False, "input_guard": spec.input_guard,
              "note": DEPLOYMENT_NOTE}
    if spec.kind == "dpd":
        return {**common, "lambda": spec.lam, "keeps_argmax": True,
                "explanation": f"decoding-time only: next-token distribution mixed toward uniform, "
                               f"p' = {1 - spec.lam:g} p + {spec.lam:g}/V; greedy output (MA, verbatim, EL) is "
                               "exactly the unguarded model's, only probability-based measures change"}
    if spec.kind == "filter":
        return {**common, "n": spec.n, "keeps_argmax": False,
                "explanation": f"decoding-time only: tokens completing a {spec.n}-gram of a forget sequence get "
                               "probability 0; the sequences are still in the weights, and the blocking itself "
                               "makes them stand out to a loss attack"}
    from .input_guards import describe_input_guard

    return {**common, "keeps_argmax": False, **describe_input_guard(spec)}


def guard(model: nn.Module, spec: DecodingSpec, forget_ids: list[list[int]], *, tokenizer=None,
          retain_ids: list[list[int]] | None = None, prefix_tokens: int = 32) -> DecodingGuard:
    """Wrap `model` in the guard `spec` names; `forget_ids` are the forget sequences' token ids (every guard but
    dpd), `retain_ids` the retain set's (icul), `tokenizer` makes the guardrail's instruction and the separator
    between in-context examples, `prefix_tokens` is the audit's (icul's forget prefixes, input_filter's window)."""
    if spec.kind == "dpd":
        return PrivateDecoding(model, spec.lam)
    if spec.kind == "filter":
        return NgramFilter(model, forget_ids, spec.n)
    if spec.input_guard:
        from .input_guards import input_guard

        return input_guard(model, spec, forget_ids, tokenizer=tokenizer, retain_ids=retain_ids,
                           prefix_tokens=prefix_tokens)
    raise ValueError(f"unknown decoding guard {spec.kind!r}")


def check_guard_inputs(spec: DecodingSpec, sets: dict) -> None:
    """Refuse, before any model is loaded, a guard the given sets cannot make: icul's examples and changed
    continuations are retain records (never the holdout: it calibrates the band)."""
    if spec.kind != "icul":
        return
    retain = sets.get("retain") or []
    if not retain:
        raise InputError(f"--decoding {spec}: needs --retain (its in-context examples and changed continuations "
                         "are retain records, never the holdout that calibrates the band)")
    if len(retain) < spec.k:
        raise InputError(f"--decoding {spec}: needs at least {spec.k} retain sequences, --retain has {len(retain)}")


class DecodingGuard(nn.Module, ABC):
    """A causal LM whose next-token distribution is rewritten at decoding time; the weights are not touched.

    `forward` takes the wrapped model's arguments and returns its output with `logits` = log p' (float32).
    Any other attribute (config, device, dtype, ...) is the wrapped model's; the weights are `self.model`'s.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def __getattr__(self, name: str):
        # nn.Module resolves only parameters, buffers and submodules; everything else is the wrapped model's.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, **kwargs):
        return self._guarded(self.model, input_ids, attention_mask, **kwargs)

    @abstractmethod
    def _guarded(self, forward, input_ids=None, attention_mask=None, **kwargs):
        """`forward` (the wrapped model, or its forward inside `generate`) called through the guard: its output
        with `logits` = log p'."""

    def generate(self, *args, **kwargs):
        """The wrapped model's `generate` with this guard inside its forward.

        The guard must act on the model's distribution before any sampling processor (temperature, top-k,
        top-p), as it would in a deployed model, so it cannot be a logits processor (those run after). For
        the call, the wrapped model's forward is shadowed by an instance attribute; `functools.wraps` keeps
        its signature, which `generate` inspects.
        """
        inner = self.model
        own = inner.__dict__.get("forward")  # accelerate hooks install an instance-level forward: keep it
        original = inner.forward
        inner.forward = functools.wraps(original)(functools.partial(self._guarded, original))
        try:
            return inner.generate(*args, **kwargs)
        finally:
            if own is None:
                del inner.forward
            else:
                inner.forward = own


class LogitGuard(DecodingGuard):
    """A guard that rewrites the logits the wrapped model returns, position by position (`rewrite`)."""

    def _guarded(self, forward, input_ids=None, attention_mask=None, **kwargs):
        if kwargs.get("labels") is not None:
            raise ValueError("a decoding guard serves inference only: a loss from `labels` would be unguarded")
        past = kwargs.get("past_key_values")
        # Read before the forward: the model appends this call's keys and values to the cache in place.
        cached = 0 if past is None else past.get_seq_length()
        out = forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        out.logits = self.rewrite(input_ids, attention_mask, cached, out.logits)
        return out

    @abstractmethod
    def rewrite(self, input_ids, attention_mask, cached: int, logits: torch.Tensor) -> torch.Tensor:
        """log p' (float32) for the positions `logits` covers (the last ones of `input_ids`).

        `cached` is the KV cache length before this call: 0 starts a new decoding, more continues one.
        """


class Continuation:
    """Per-row state of the decoding a guard is serving, kept across KV-cache calls.

    A call with an empty or no cache starts a new decoding (`rows` made afresh by `new_row`), a call with a cache
    continues the last one: its cache must be as long as the widths served so far (`width`). One decoding at a
    time per guard; a cache that does not continue it is an error.
    """

    def __init__(self) -> None:
        self.rows: list = []
        self.width = 0  # padded width served so far: the KV cache length of the current decoding

    def follow(self, rows: int, cached: int, new_row, name: str) -> None:
        if cached == 0:
            self.rows, self.width = [new_row() for _ in range(rows)], 0
        elif cached != self.width or len(self.rows) != rows:
            raise RuntimeError(f"{name}: the KV cache ({cached} positions, {rows} rows) does not continue this "
                               f"guard's decoding ({self.width}, {len(self.rows)} rows)")


class PrivateDecoding(LogitGuard):
    """DPD: p' = (1 - lam) p + lam / V."""

    def __init__(self, model: nn.Module, lam: float):
        super().__init__(model)
        if not 0 <= lam < 1:
            raise ValueError(f"lambda must be in [0, 1), got {lam}")
        self.lam = lam

    def rewrite(self, input_ids, attention_mask, cached: int, logits: torch.Tensor) -> torch.Tensor:
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        if self.lam == 0:
            return logprobs
        uniform = math.log(self.lam) - math.log(logprobs.shape[-1])
        # log((1 - lam) p + lam / V) = logaddexp(log(1 - lam) + log p, log(lam / V)): no exp of raw logits,
        # no log of a sum that underflowed.
        return torch.logaddexp(logprobs + math.log1p(-self.lam), logprobs.new_tensor(uniform))


class NgramFilter(LogitGuard):
    """Blocks every token that would complete an n-gram of a forget sequence.

    The context of a position is the real tokens (attention mask 1) up to and including it. Under a KV
    cache the model sees only the new tokens of each call, so the guard keeps each row's history itself:
    a call with an empty or no cache starts a new decoding, a call with a cache continues the last one.
    One decoding at a time per guard; a cache that does not continue it is an error.
    """

    def __init__(self, model: nn.Module, forget_ids: list[list[int]], n: int = DEFAULT_N):
        super().__init__(model)
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        self.n = n
        table: defaultdict[tuple[int, ...], set[int]] = defaultdict(set)
        for ids in forget_ids:
            for i in range(len(ids) - n + 1):
                table[tuple(ids[i : i + n - 1])].add(ids[i + n - 1])
        # (n-1)-gram -> next tokens to block, sorted so the index tensors are deterministic
        self.table: dict[tuple[int, ...], list[int]] = {key: sorted(value) for key, value in table.items()}
        self._decoding = Continuation()  # rows: the real tokens so far, per row of the current decoding

    def rewrite(self, input_ids, attention_mask, cached: int, logits: torch.Tensor) -> torch.Tensor:
        if input_ids is None:
            raise ValueError("the n-gram filter needs input_ids (it reads tokens, not embeddings)")
        self._decoding.follow(len(input_ids), cached, list, "n-gram filter")
        width = input_ids.shape[1]
        real = torch.ones_like(input_ids) if attention_mask is None else attention_mask[:, -width:]
        first = width - logits.shape[1]  # logits may cover only the last positions (logits_to_keep)
        vocab = logits.shape[-1]
        cells: list[tuple[int, int]] = []  # (row, logits column) where something is blocked
        blocked: list[list[int]] = []
        for row, (ids, keep, history) in enumerate(zip(input_ids.tolist(), real.tolist(), self._decoding.rows,
                                                       strict=True)):
            for column, (token, is_real) in enumerate(zip(ids, keep, strict=True)):
                if not is_real:  # padding is not context, and its logits are never read
                    continue
                history.append(token)
                if column < first or len(history) < self.n - 1:
                    continue
                tokens = self.table.get(tuple(history[len(history) - self.n + 1 :]))
                if tokens and len(tokens) < vocab:  # all blocked: leave the distribution alone
                    cells.append((row, column - first))
                    blocked.append(tokens)
        self._decoding.width += width
        return self._block(torch.log_softmax(logits.float(), dim=-1), cells, blocked)

    @staticmethod
    def _block(logprobs: torch.Tensor, cells: list[tuple[int, int]], blocked: list[list[int]]) -> torch.Tensor:
        """Zero the blocked tokens' probability and renormalize, only at the cells that have any."""
        if not cells:
            return logprobs
        device = logprobs.device
        rows = torch.tensor([r for r, _ in cells], device=device)
        columns = torch.tensor([c for _, c in cells], device=device)
        which = torch.tensor([k for k, tokens in enumerate(blocked) for _ in tokens], device=device)
        tokens = torch.tensor([v for ts in blocked for v in ts], device=device)
        sub = logprobs[rows, columns]  # (cells, V), a copy
        sub[which, tokens] = -math.inf
        sub = torch.log_softmax(sub, dim=-1).index_put((which, tokens), sub.new_tensor(BLOCKED_LOGPROB))
        # In place saves a copy of the (batch, width, V) tensor; autograd forbids it when a gradient flows.
        put = logprobs.index_put if torch.is_grad_enabled() else logprobs.index_put_
        return put((rows, columns), sub)
