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
USAGE = "expected dpd:LAMBDA (0 <= LAMBDA < 1) or filter:N (integer N >= 1; plain `filter` means filter:4)"


@dataclass(frozen=True)
class DecodingSpec:
    kind: str  # "dpd" | "filter"
    lam: float = 0.0  # dpd: weight of the uniform distribution
    n: int = DEFAULT_N  # filter: n-gram length

    def __str__(self) -> str:
        return f"dpd:{self.lam:g}" if self.kind == "dpd" else f"filter:{self.n}"


def parse_decoding(spec: str) -> DecodingSpec:
    """`dpd:LAMBDA` or `filter[:N]` (the CLI flag `--decoding`); anything else is an InputError."""
    kind, sep, value = spec.strip().partition(":")
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
        try:
            n = int(value)
        except ValueError:
            raise InputError(f"--decoding {spec!r}: {USAGE}") from None
        if n < 1:
            raise InputError(f"--decoding {spec!r}: N must be at least 1, got {n}")
        return DecodingSpec("filter", n=n)
    raise InputError(f"--decoding {spec!r}: {USAGE}")


def describe(spec: DecodingSpec) -> dict:
    """What a report must say about a guarded model."""
    if spec.kind == "dpd":
        return {"decoding": str(spec), "kind": "dpd", "lambda": spec.lam, "weights_changed": False,
                "keeps_argmax": True,
                "explanation": f"decoding-time only: next-token distribution mixed toward uniform, "
                               f"p' = {1 - spec.lam:g} p + {spec.lam:g}/V; greedy output (MA, verbatim, EL) is "
                               "exactly the unguarded model's, only probability-based measures change"}
    return {"decoding": str(spec), "kind": "filter", "n": spec.n, "weights_changed": False, "keeps_argmax": False,
            "explanation": f"decoding-time only: tokens completing a {spec.n}-gram of a forget sequence get "
                           "probability 0; the sequences are still in the weights, and the blocking itself "
                           "makes them stand out to a loss attack"}


def guard(model: nn.Module, spec: DecodingSpec, forget_ids: list[list[int]]) -> DecodingGuard:
    """Wrap `model` in the guard `spec` names; `forget_ids` are the forget sequences' token ids (filter only)."""
    if spec.kind == "dpd":
        return PrivateDecoding(model, spec.lam)
    if spec.kind == "filter":
        return NgramFilter(model, forget_ids, spec.n)
    raise ValueError(f"unknown decoding guard {spec.kind!r}")


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


class PrivateDecoding(DecodingGuard):
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


class NgramFilter(DecodingGuard):
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
        self._history: list[list[int]] = []  # real tokens so far, per row of the current decoding
        self._width = 0  # padded width so far: the KV cache length of the current decoding

    def rewrite(self, input_ids, attention_mask, cached: int, logits: torch.Tensor) -> torch.Tensor:
        if input_ids is None:
            raise ValueError("the n-gram filter needs input_ids (it reads tokens, not embeddings)")
        if cached == 0:
            self._history, self._width = [[] for _ in range(len(input_ids))], 0
        elif cached != self._width or len(self._history) != len(input_ids):
            raise RuntimeError(f"n-gram filter: the KV cache ({cached} positions, {len(input_ids)} rows) does not "
                               f"continue this guard's decoding ({self._width}, {len(self._history)} rows)")
        width = input_ids.shape[1]
        real = torch.ones_like(input_ids) if attention_mask is None else attention_mask[:, -width:]
        first = width - logits.shape[1]  # logits may cover only the last positions (logits_to_keep)
        vocab = logits.shape[-1]
        cells: list[tuple[int, int]] = []  # (row, logits column) where something is blocked
        blocked: list[list[int]] = []
        for row, (ids, keep, history) in enumerate(zip(input_ids.tolist(), real.tolist(), self._history,
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
        self._width += width
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
