"""What a method sees: the token sets, the model, the frozen original, batching and sequence log-probs;
and what the unlearning leaves (the outcome)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..io.models import Runtime
from ..io.tokens import pad
from ..measure.band import Band, LossBand
from ..measure.scoring import token_logprobs


@dataclass
class TokenSets:
    forget: list[list[int]]
    forget_names: list[str]
    holdout: list[list[int]]
    retain: list[list[int]] | None
    general: list[list[int]]
    neighbours: list[list[int]] | None = None
    """Unseen in-domain text that must stay as it was (`--neighbours`): the loop adds neighbour_weight * KL to
    the original model on a batch of them each step. Never the holdout, which calibrates the band."""


@dataclass
class LoopOutcome:
    steps: int
    stop_reason: str
    band: Band
    tokens_trained: int
    restored_step: int | None = None


# What a forget loss averages over: the tokens x_2..x_T it predicts, every token, or whole sequences.
PREDICTED_TOKENS, TOKENS, SEQUENCES = "predicted tokens", "tokens", "sequences"


@dataclass
class Batch:
    """Right-padded token ids of some sequences, with their indices in the set they come from."""

    indices: list[int]
    input_ids: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def of(cls, token_lists: list[list[int]], indices: list[int], pad_id: int, device: torch.device) -> Batch:
        input_ids, mask = pad([token_lists[i] for i in indices], pad_id, device=device)
        return cls(list(indices), input_ids, mask)

    @property
    def target_mask(self) -> torch.Tensor:
        """Which of the predicted tokens x_2..x_T are real (not padding)."""
        return self.mask[:, 1:].float()

    def units(self, kind: str) -> float:
        """How many of `kind` the batch holds: what a forget loss averages over (a method's `averages_over`)."""
        if kind == PREDICTED_TOKENS:
            return float(self.target_mask.sum())
        if kind == TOKENS:
            return float(self.mask.sum())
        if kind == SEQUENCES:
            return float(len(self.indices))
        raise ValueError(f"unknown loss units {kind!r}")


@dataclass(frozen=True)
class StepState:
    """What the loop measured before this step, for a method that steers each sequence into the band: the MA
    band and the loss band of the last calibration, moved in by the margin (what the loop aims at), and the prefix
    length a verbatim check uses."""

    band: Band
    loss_band: LossBand
    prefix_tokens: int


@dataclass
class Context:
    model: torch.nn.Module
    runtime: Runtime
    pad_id: int
    forget_ids: list[list[int]]
    before: dict[str, list] = field(default_factory=dict, repr=False)
    """Scores of the input model from the audit before unlearning (`measure.scoring.TokenScores`): "forget"
    (every driven forget sequence, in `forget_ids` order) and "holdout". What is known of the model before
    any step is not measured again: NPO's reference, the loop's step-0 scores and step-0 band."""
    changed: bool = False
    """Whether any stage has changed the weights yet (then `before` no longer describes the current model)."""
    step: StepState | None = None
    """Set by the loop before each step's loss (None outside the loop)."""
    copy_original: Callable[[torch.nn.Module], torch.nn.Module] | None = field(default=None, repr=False)
    """How `keep_original` copies the model: copy.deepcopy (None), or under FSDP a sharded copy
    (`fsdp.Sharded.frozen_copy`)."""
    _original: torch.nn.Module | None = field(default=None, repr=False)

    @property
    def original(self) -> torch.nn.Module:
        """A frozen copy of the model as it was before unlearning, made only for methods that need it."""
        if self._original is None:
            raise RuntimeError("the original model was not kept; call keep_original() before training")
        return self._original

    def keep_original(self) -> None:
        if self._original is None:
            self._original = (self.copy_original or copy.deepcopy)(self.model).eval().requires_grad_(False)

    def token_logprobs(self, batch: Batch, model: torch.nn.Module | None = None) -> torch.Tensor:
        """log p(x_t | x_<t) for t = 2..T, zero on padding; differentiable unless `model` is frozen."""
        logprobs = token_logprobs(model or self.model, batch.input_ids, batch.mask, self.runtime)
        return logprobs * batch.target_mask

    def sequence_logprobs(self, batch: Batch, model: torch.nn.Module | None = None) -> torch.Tensor:
        return self.token_logprobs(batch, model).sum(-1)
