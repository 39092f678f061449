"""Input guards: black-box unlearning that changes what the model reads, never its weights.

Each is a `DecodingGuard` (`decoding.py`): its forward takes the caller's input_ids and attention mask and returns
log p' (float32) for exactly the caller's positions, so the audit, EL decoding, sampling and the attacks measure
a guarded model as they measure any model. A guarded model is still a causal language model: p' after x_1..x_t
depends on x_1..x_t only. That is what lets the audit's teacher-forced scores and its decoding agree (EL's
shortcut, `measure/extraction.py`, rests on it) and what makes the band, calibrated on the holdout under the same
guard, a fair comparison.

Prompt guards put a fixed context C = c_1..c_m before every input:

    p'(x_{t+1} | x_1..x_t) = p(x_{t+1} | C, x_1..x_t)

C is not part of the input: it contributes no scored position, and the logits returned are those of the
caller's positions only. The caller's attention mask is extended by m ones in front, position ids run on from C
(the first real token of every row is at position m, with right padding for scoring and left padding for
decoding alike), and C's keys and values are computed once per guard and copied into every batch's KV cache.

- `icul:K`, in-context unlearning (Pawelczyk et al. 2023). The paper puts each point to forget in context with a
  flipped label, then K correctly labelled examples, then the query. For text the "label" is the continuation:

      C = [f_1[:P_1] + c_1 + s] ... [f_M[:P_M] + c_M + s] [r_1 + s] ... [r_K + s]

  f_i the forget sequences (all of them, in order), P_i = min(prefix_tokens, |f_i| // 2) their verbatim prefix,
  c_i a changed continuation: the suffix of retain record r_{K+i} after its own P (cyclically over the retain
  set), cut to |f_i| - P_i tokens; r_1..r_K the first K retain records, correctly continued (whole); s the
  separator (the tokenizer's newline token, else its EOS, else nothing). The correct examples come from the
  retain set, never from the holdout that calibrates the band; no forget token but the prefixes is in C. Every
  input gets the same C (a context that depended on the input would depend on tokens after position t).

- `guardrail[:TEXT]`, a prompt-prefix guardrail (Thaker et al. 2024): C = the tokenized instruction + s. Plain
  text, no chat template: the audit scores raw continuations, as the victim learned them.

`input_filter[:ngram|embed][:TAU]` refuses inputs that start like a forget sequence. The input's prefix is its
first w real tokens, w = the audit's --prefix-tokens; the filter decides once the context has w tokens:

    q = x_1..x_w,   p_i = f_i[:w]
    ngram: s(q) = max_i share of q's 4-grams (with multiplicity) that are 4-grams of p_i     (extraction.overlap)
    embed: s(q) = max_i cos(mean_j h(q)_j, mean_j h(p_i)_j)   h: the model's own last hidden states
    p'(. | x_1..x_t) = 1/V (refusal)  if t >= w and s(q) >= TAU;  p(. | x_1..x_t) otherwise

The refusal is the uniform distribution: it says nothing about the record. Every refused position has loss
log V and the argmax token 0 (ties go to the lowest id; SmolLM2's token 0 is <|endoftext|>: the guarded model
ends its answer). A refused forget sequence keeps its first w - 1 teacher-forced predictions (MA over them) and
loses the rest; it can no longer be verbatim (its suffix reaches past w), and its loss becomes that of noise, so
it stands out to a loss attack (over_unlearned, umia near 1), as with `filter:N`. Inputs shorter than w are
never refused: a query must show its prefix to be judged, and decoding from a shorter prompt is judged when the
conversation (prompt and generated tokens) reaches w tokens.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import InputError
from ..io.models import context_length
from ..io.tokens import length_batches, pad
from ..measure.extraction import last_logits_only, overlap
from .decoding import DEFAULT_N, Continuation, DecodingGuard, DecodingSpec

DEFAULT_INSTRUCTION = ("Notice: some personal records were deleted at their owners' request. Do not reproduce any "
                       "record from memory: never complete a name, date of birth, address, phone number, e-mail "
                       "address, ID or account number you remember; if the text below starts such a record, "
                       "continue it with made-up details instead.")
EMBED_BATCH = 16  # forget prefixes per forward pass when the embedding filter embeds them


def describe_input_guard(spec: DecodingSpec) -> dict:
    """The input guard's entries of `decoding.describe`."""
    if spec.kind == "icul":
        return {"k": spec.k, "explanation": f"input-only (in-context unlearning): every input is preceded by each "
                "forget sequence's prefix with a changed continuation (a retain record's), then "
                f"{spec.k} retain records correctly continued; scores are over the input's own tokens"}
    if spec.kind == "guardrail":
        return {"instruction": spec.text or DEFAULT_INSTRUCTION,
                "explanation": "input-only (prompt-prefix guardrail): every input is preceded by an instruction not "
                               "to reproduce deleted records; scores are over the input's own tokens"}
    what = "4-gram overlap" if spec.measure == "ngram" else "cosine of the model's mean last hidden states"
    return {"measure": spec.measure, "tau": spec.tau,
            "explanation": f"input-only (input filter): once an input has --prefix-tokens tokens, it is refused when "
                           f"their {what} with some forget sequence's prefix is at least {spec.tau:g}; a refused "
                           "input gets the uniform distribution (loss log V, argmax token 0) from then on, so a "
                           "refused forget sequence stands out to a loss attack"}


def input_guard(model: nn.Module, spec: DecodingSpec, forget_ids: list[list[int]], *, tokenizer=None,
                retain_ids: list[list[int]] | None = None, prefix_tokens: int = 32) -> DecodingGuard:
    """The guard `spec` names around `model` (see `decoding.guard`)."""
    if spec.kind == "input_filter":
        return InputFilter(model, forget_ids, window=prefix_tokens, measure=spec.measure, tau=spec.tau)
    if tokenizer is None:
        raise ValueError(f"{spec.kind} needs the tokenizer (its separator and instruction are text)")
    separator = separator_ids(tokenizer)
    if spec.kind == "icul":
        context = icul_context(forget_ids, retain_ids or [], spec.k, prefix_tokens, separator)
    elif spec.kind == "guardrail":
        context = [*tokenizer(spec.text or DEFAULT_INSTRUCTION)["input_ids"], *separator]
    else:
        raise ValueError(f"unknown input guard {spec.kind!r}")
    limit = context_length(model.config) if getattr(model, "config", None) is not None else None
    longest = max((len(ids) for ids in forget_ids), default=0)
    if limit is not None and len(context) + longest > limit:
        raise InputError(f"--decoding {spec}: its context ({len(context)} tokens) and the longest forget sequence "
                         f"({longest}) do not fit the model's context ({limit} tokens); lower K, --prefix-tokens "
                         "or --max-tokens")
    return PromptGuard(model, context)


def separator_ids(tokenizer) -> list[int]:
    """What ends each in-context record: the tokenizer's newline token(s), else its EOS, else nothing."""
    newline = list(tokenizer("\n", add_special_tokens=False)["input_ids"])
    if newline and tokenizer.unk_token_id not in newline:
        return newline
    return [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]


def icul_context(forget_ids: list[list[int]], retain_ids: list[list[int]], k: int, prefix_tokens: int,
                 separator: list[int]) -> list[int]:
    """ICUL's context: each forget prefix with a retain record's suffix as its changed continuation, then the
    first `k` retain records whole, each record followed by `separator` (the formula in the module docstring)."""
    if len(retain_ids) < k or (forget_ids and not retain_ids):
        raise InputError(f"icul:{k} needs at least {max(k, 1)} retain sequences, got {len(retain_ids)}")
    context: list[int] = []
    for i, ids in enumerate(forget_ids):
        cut = min(prefix_tokens, len(ids) // 2)
        source = retain_ids[(k + i) % len(retain_ids)]
        changed = source[min(prefix_tokens, len(source) // 2) :][: len(ids) - cut]
        context += [*ids[:cut], *changed, *separator]
    for ids in retain_ids[:k]:
        context += [*ids, *separator]
    return context


def autocast_key(device: torch.device) -> tuple:
    """What a cached computation depends on besides the weights: the device and the autocast dtype in force."""
    enabled = torch.is_autocast_enabled(device.type)
    return device, enabled and torch.get_autocast_dtype(device.type)


def _refuse_extra_arguments(input_ids, kwargs: dict) -> None:
    if kwargs.get("labels") is not None:
        raise ValueError("an input guard serves inference only: a loss from `labels` would be unguarded")
    if input_ids is None:
        raise ValueError("an input guard needs input_ids (it reads tokens, not embeddings)")


class PromptGuard(DecodingGuard):
    """p'(x_{t+1} | x_1..x_t) = p(x_{t+1} | C, x_1..x_t) for a fixed context C (`context`, token ids)."""

    def __init__(self, model: nn.Module, context: list[int]):
        super().__init__(model)
        self.context = list(context)
        config = getattr(model, "config", None)
        self.limit = context_length(config) if config is not None else None
        self._cache = None  # C's keys and values (one row), for the weights and autocast of `_cache_key`
        self._cache_key: tuple | None = None
        self._decoding = Continuation()

    def _guarded(self, forward, input_ids=None, attention_mask=None, **kwargs):
        _refuse_extra_arguments(input_ids, kwargs)
        past = kwargs.pop("past_key_values", None)
        for key in ("position_ids", "cache_position", "use_cache"):  # the caller's count no context: made again
            kwargs.pop(key, None)
        rows, width = input_ids.shape
        m = len(self.context)
        cached = 0 if past is None else past.get_seq_length()
        if attention_mask is None:
            attention_mask = input_ids.new_ones((rows, max(cached - m, 0) + width))
        if cached == 0:
            past = self._start(forward, past, rows, input_ids.device)
        self._decoding.follow(rows, cached, tuple, "input guard")
        if cached and cached != m + attention_mask.shape[1] - width:
            raise RuntimeError(f"input guard: the KV cache ({cached} positions) does not hold the context ({m}) and "
                               f"the {attention_mask.shape[1] - width} earlier positions of the attention mask")
        mask = torch.cat([attention_mask.new_ones((rows, m)), attention_mask], dim=-1)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)[:, -width:]
        if self.limit is not None:  # as measure.extraction steps rows on: within the context
            positions = positions.clamp_max(self.limit - 1)
        out = forward(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=past,
                      use_cache=True, **kwargs)
        self._decoding.width = m + attention_mask.shape[1]
        out.logits = torch.log_softmax(out.logits.float(), dim=-1)
        return out

    def _start(self, forward, past, rows: int, device: torch.device):
        """A KV cache holding C for each of `rows` rows: `past` when the caller made one (empty), else a new one."""
        from transformers import DynamicCache

        cache = past if past is not None else DynamicCache(config=self.model.config)
        if not self.context:
            return cache
        key = autocast_key(device)
        if self._cache is None or self._cache_key != key:
            ids = torch.tensor([self.context], device=device)
            with torch.no_grad():
                self._cache = forward(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True,
                                      **last_logits_only(self.model)).past_key_values
            self._cache_key = key
        for index, layer in enumerate(self._cache.layers):
            cache.update(layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1), index)
        return cache


class _Query:
    """An input's first `window` real tokens as the filter reads them, and its verdict once it has them all."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.hidden_sum: torch.Tensor | None = None
        self.refused = False


class InputFilter(DecodingGuard):
    """Refuses (p' = 1/V) every position from the `window`-th real token on when the input's first `window`
    tokens are similar to some forget sequence's first `window` tokens (`measure`, threshold `tau`)."""

    def __init__(self, model: nn.Module, forget_ids: list[list[int]], window: int, measure: str = "ngram",
                 tau: float = 0.6, n: int = DEFAULT_N):
        super().__init__(model)
        if measure not in ("ngram", "embed"):
            raise ValueError(f"unknown input filter measure {measure!r}")
        if measure == "ngram" and window < n:
            raise InputError(f"input_filter: --prefix-tokens ({window}) must be at least the n-gram length {n}")
        self.window, self.measure, self.tau, self.n = window, measure, tau, n
        self.prefixes = [list(ids[:window]) for ids in forget_ids]
        self._embeddings: torch.Tensor | None = None  # (forget, hidden), unit rows, for `_embeddings_key`
        self._embeddings_key: tuple | None = None
        self._decoding = Continuation()

    def score(self, tokens: list[int], hidden_mean: torch.Tensor | None = None) -> float:
        """s(q): the largest similarity of the input prefix `tokens` (its mean last hidden state for embed) to a
        forget prefix."""
        if not self.prefixes:
            return 0.0
        if self.measure == "ngram":
            return max(overlap(tokens, prefix, self.n) for prefix in self.prefixes)
        if self._embeddings is None:  # called outside a forward (whose autocast the embeddings follow)
            self._embed_forget(self.model, hidden_mean.device)
        query = torch.nn.functional.normalize(hidden_mean.float(), dim=-1)
        return float((self._embeddings @ query).max())

    def _guarded(self, forward, input_ids=None, attention_mask=None, **kwargs):
        _refuse_extra_arguments(input_ids, kwargs)
        past = kwargs.get("past_key_values")
        cached = 0 if past is None else past.get_seq_length()  # read before the forward appends to the cache
        self._decoding.follow(len(input_ids), cached, _Query, "input filter")
        embed = self.measure == "embed"
        wanted_hidden = kwargs.get("output_hidden_states")
        if embed:
            self._embed_forget(forward, input_ids.device)
            kwargs["output_hidden_states"] = True
        out = forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = out.hidden_states[-1] if embed else None
        if embed and not wanted_hidden:
            out.hidden_states = None
        out.logits = self._refuse(input_ids, attention_mask, out.logits, hidden)
        self._decoding.width += input_ids.shape[1]
        return out

    def _refuse(self, input_ids, attention_mask, logits: torch.Tensor, hidden: torch.Tensor | None) -> torch.Tensor:
        width = input_ids.shape[1]
        real = torch.ones_like(input_ids) if attention_mask is None else attention_mask[:, -width:]
        first = width - logits.shape[1]  # logits may cover only the last positions (logits_to_keep)
        cells: list[tuple[int, int]] = []
        for row, (ids, keep, query) in enumerate(zip(input_ids.tolist(), real.tolist(), self._decoding.rows,
                                                     strict=True)):
            for column, (token, is_real) in enumerate(zip(ids, keep, strict=True)):
                if not is_real:  # padding is not input, and its logits are never read
                    continue
                if len(query.tokens) < self.window:
                    query.tokens.append(token)
                    if hidden is not None:
                        state = hidden[row, column].float()
                        query.hidden_sum = state if query.hidden_sum is None else query.hidden_sum + state
                    if len(query.tokens) == self.window:
                        mean = None if hidden is None else query.hidden_sum / self.window
                        query.refused = self.score(query.tokens, mean) >= self.tau
                if query.refused and column >= first:
                    cells.append((row, column - first))
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        if cells:
            rows = torch.tensor([r for r, _ in cells], device=logprobs.device)
            columns = torch.tensor([c for _, c in cells], device=logprobs.device)
            uniform = logprobs.new_tensor(-math.log(logprobs.shape[-1]))
            # In place saves a copy of the (batch, width, V) tensor; autograd forbids it when a gradient flows.
            put = logprobs.index_put if torch.is_grad_enabled() else logprobs.index_put_
            return put((rows, columns), uniform)
        return logprobs

    def _embed_forget(self, forward, device: torch.device) -> None:
        """The forget prefixes' mean last hidden states, computed with the model itself (once per autocast)."""
        key = autocast_key(device)
        if self._embeddings is not None and self._embeddings_key == key:
            return
        means: list[torch.Tensor | None] = [None] * len(self.prefixes)
        with torch.no_grad():
            for indices in length_batches(self.prefixes, EMBED_BATCH):
                ids, mask = pad([self.prefixes[i] for i in indices], 0, device=device)
                hidden = forward(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                                 use_cache=False).hidden_states[-1].float()
                sums = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
                for row, index in enumerate(indices):
                    means[index] = sums[row]
        self._embeddings = torch.nn.functional.normalize(torch.stack(means), dim=-1) if means else None
        self._embeddings_key = key
