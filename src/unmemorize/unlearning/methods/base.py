"""What a method is: a class that unlearns (its forget loss, what the loss averages over, its options), and
the specs that give it names (selection, default retain regularizer, default learning rate).

A method file declares
  - its options: a pydantic model subclassing `MethodConfig` (every field with a default and a description,
    ranges with Field(gt=..., ge=...)), set by users with `--method-arg KEY=VALUE` or `method_args:`;
  - its class: a `GradientMethod` (the loop minimizes `loss`; the class says what the loss averages over in
    `averages_over` and, optionally, which parameters it trains in `trainable`), or any `Method` with its own
    `unlearn` (the task vector);
  - `SPECS`: the names it goes by, each a `MethodSpec` (summary, stages, selection, retain loss, lr).
`methods/__init__.py` gathers every file's SPECS into the registry.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from ...errors import InputError
from ..context import SEQUENCES, Batch, Context
from ..target import ALL, BAND, TWO_WAY

if TYPE_CHECKING:
    from ..session import Session

__all__ = ["ALL", "BAND", "TWO_WAY", "GradientMethod", "Method", "MethodConfig", "MethodSpec"]


class MethodConfig(BaseModel):
    """A method's options. None by default; a method's subclass adds its fields."""

    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)


class Method(ABC):
    """One stage of unlearning. `unlearn` changes `session.ctx.model` and records what it did in the session."""

    Config: ClassVar[type[MethodConfig]] = MethodConfig

    def __init__(self, config: MethodConfig | None = None, tokenizer=None) -> None:
        self.config = config if config is not None else type(self).Config()
        self.tokenizer = tokenizer

    @abstractmethod
    def unlearn(self, session: Session) -> None:
        """Unlearn: change `session.ctx.model`, set `session.outcome` (and `session.lam`)."""


class GradientMethod(Method):
    """A forget loss that the loop (`unlearning.loop`) minimizes with Adam, step by step, until the stop rule."""

    averages_over: ClassVar[str] = SEQUENCES
    """What `loss` is a mean over (context.PREDICTED_TOKENS, TOKENS or SEQUENCES): under data parallelism each
    process's share of the loss is weighted by how many of these it holds."""

    def prepare(self, ctx: Context) -> None:
        """Precompute what the loss needs from the model before training (called once, before the first step)."""

    @abstractmethod
    def loss(self, ctx: Context, forget: Batch, retain: Batch | None) -> torch.Tensor:
        """The forget loss on `forget` (the loop adds the retain regularizer), a mean over `averages_over`."""

    def trainable(self, model) -> list[torch.nn.Parameter] | None:
        """The parameters this method trains; None: every one (or the LoRA adapters under --lora)."""
        return None

    def unlearn(self, session: Session) -> None:
        from ..loop import gradient_unlearn
        from ..weights import merge, trainable

        ctx, settings = session.ctx, session.settings
        ctx.model, params, grad_mask = trainable(ctx, self, settings, session.sets, session.work,
                                                 session.accelerator.is_main_process)
        session.outcome = gradient_unlearn(ctx, self, params, settings, session.sets, session.work,
                                           session.utility_before, session.accelerator, grad_mask,
                                           selection=session.spec.selection)
        ctx.model = merge(session.accelerator.unwrap_model(ctx.model))


@dataclass(frozen=True)
class MethodSpec:
    """A method by name: its stages (method classes run one after the other, each on what the previous left),
    which forget sequences they train on (ALL; BAND: only those blocking the target; TWO_WAY: those, and those
    over-unlearned on loss, to pull back: the loop passes the bands of the step in `ctx.step`), the retain
    regularizer it adds by default (none | nll | kl), its default learning rate, margin (`--margin`) and
    localization (`--localize`)."""

    name: str
    summary: str
    stages: tuple[type[Method], ...]
    selection: str = ALL
    retain_loss: str = "none"
    lr: float = 2e-5
    margin: float = 0.0  # the loop aims this fraction of each band's width inside it (`--margin`)
    localize: str = "none"  # causal:K: only the MLPs of the K layers causal tracing ranks first train (`--localize`)

    def __post_init__(self) -> None:
        if self.selection not in (ALL, BAND, TWO_WAY):
            raise ValueError(f"{self.name}: selection must be {ALL!r}, {BAND!r} or {TWO_WAY!r}")
        seen: set[str] = set()
        for stage in self.stages:
            shared = seen & set(stage.Config.model_fields)
            if shared:
                raise ValueError(f"{self.name}: option {sorted(shared)[0]!r} is declared by two stages")
            seen |= set(stage.Config.model_fields)

    @cached_property
    def config(self) -> type[MethodConfig]:
        """The options of every stage together (one model: what `--method-arg` is checked against)."""
        if len(self.stages) == 1:
            return self.stages[0].Config
        fields: dict[str, Any] = {}
        for stage in self.stages:
            fields |= {key: (field.annotation, field) for key, field in stage.Config.model_fields.items()}
        return create_model(f"{self.name}Config", __base__=MethodConfig, **fields)

    def describe(self) -> dict:
        """{"summary": ..., "options": {key: {"default": ..., "help": ...}}, and the loop's defaults for it: lr,
        retain_loss, selection, margin, localize} (`unmemorize methods --json`)."""
        return {"summary": self.summary, "lr": self.lr, "retain_loss": self.retain_loss, "selection": self.selection,
                "margin": self.margin, "localize": self.localize,
                "options": {key: {"default": field.default, "help": field.description or ""}
                            for key, field in self.config.model_fields.items()}}

    def validate(self, args: dict[str, Any]) -> dict[str, Any]:
        """The given options checked against this method's, with their values converted (`beta: "0.5"` becomes
        0.5); InputError naming the method, the key and what is allowed when one is unknown or out of range."""
        args = {str(key).replace("-", "_"): value for key, value in args.items()}
        try:
            options = self.config(**args)
        except ValidationError as error:
            raise InputError(self._explain(error.errors()[0], args)) from None
        return {key: getattr(options, key) for key in args}

    def build(self, args: dict[str, Any], tokenizer) -> list[Method]:
        """One object per stage, each with its own options out of `args` (already validated)."""
        return [stage(stage.Config(**{k: v for k, v in args.items() if k in stage.Config.model_fields}),
                      tokenizer=tokenizer) for stage in self.stages]

    def _explain(self, error: dict, args: dict[str, Any]) -> str:
        key = str(error["loc"][0]) if error["loc"] else "?"
        given = f"--method-arg {key}={args[key]}" if key in args else f"--method-arg {key}"
        if error["type"] == "extra_forbidden":
            known = ", ".join(self.config.model_fields)
            return f"{given}: {self.name} has no option {key!r} ({f'its options: {known}' if known else 'it has none'})"
        return f"{given}: {self.name}'s {key} {requirement(error)}"


_BOUNDS = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="), "less_than": ("lt", "<"),
           "less_than_equal": ("le", "<=")}
_TYPES = {"int": "an integer", "float": "a number", "string": "a string", "bool": "true or false"}


def requirement(error: dict) -> str:
    """'must be > 0', 'must be an integer', ... from a pydantic error."""
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind in _BOUNDS:
        name, sign = _BOUNDS[kind]
        bound = ctx[name]
        return f"must be {sign} {bound:g}" if isinstance(bound, int | float) else f"must be {sign} {bound}"
    if kind == "string_too_short":
        return "must not be empty"
    prefix = kind.split("_")[0]
    if prefix in _TYPES:
        return f"must be {_TYPES[prefix]}"
    return error["msg"].replace("Input should be", "must be")
