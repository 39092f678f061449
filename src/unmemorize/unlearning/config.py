"""Settings of the unlearning loop: validated, with the same names as the command-line options.

A run's settings (`unmemorize.runs.config.UnlearnSettings`) add what is evaluated around it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator, model_validator

from ..errors import InputError
from ..measure.audit import AuditSettings
from .localize import localized, parse_localize
from .methods import METHODS, MethodSpec


class LoopSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: str = Field("hinge", description="A name from `unmemorize methods` (default: hinge, the recommended "
                        "method).")
    method_args: dict[str, Any] = Field({}, description="The method's options (`unmemorize methods`): "
                                        "--method-arg KEY=VALUE.")
    lr: float | None = Field(None, gt=0, description="Learning rate (default: the method's).")
    max_steps: int = Field(200, ge=0, description="A cap on gradient steps under every stop rule.")
    stop: Literal["band", "mean", "steps"] = Field("band", description="band: target reached; mean: forget mean "
                                                   "MA under holdout mean; steps: run --max-steps (task vector: "
                                                   "lambda = --max-lambda). See unlearn.target.")
    target: Literal["ma", "indistinguishable"] = Field("indistinguishable", description="ma: no forget sequence "
                                                       "extractable (MA above the band) or verbatim; "
                                                       "indistinguishable (the default, SPEC): ma, and every forget "
                                                       "sequence's loss inside the loss band too. See "
                                                       "unlearning.target.")
    margin: float | None = Field(None, ge=0, lt=0.5, description="Aim inside the bands by this fraction of their "
                                 "width: a forget sequence gets gradient until its MA is under upper - margin * "
                                 "width and its loss inside the loss band moved in as much (default: the "
                                 "method's; the target itself is judged on the bands).")
    retain_loss: Literal["none", "nll", "kl"] | None = Field(None, description="Retain regularizer "
                                                             "(default: the method's).")
    retain_weight: float = Field(1.0, ge=0, description="Weight of the retain regularizer.")
    retain_batch: int = Field(12, ge=1, description="Retain sequences per step.")
    neighbour_weight: float = Field(3.0, ge=0, description="Weight of KL(original || current) on a batch of "
                                    "--neighbours (unseen in-domain text that must stay as it was) each step, "
                                    "for any gradient method; unused without --neighbours.")
    sam_rho: float = Field(0.0, ge=0, allow_inf_nan=False, description="Sharpness-aware unlearning (Fan et al. "
                           "2025): take the forget loss's gradient at the worst weights within this L2 radius of "
                           "the trained weights (0: off, the plain step); one more forward and backward of the "
                           "forget batch per step. Gradient methods only. See unlearning.loop.")
    optimizer: Literal["adam", "sophia"] = Field("adam", description="adam: Adam, betas (0.9, 0.98); sophia: "
                                                 "Sophia (Liu et al. 2023) as second-order unlearning uses it (SOUL, "
                                                 "Jia et al. 2024): momentum over a diagonal Hessian estimate, "
                                                 "clipped so that no weight moves more than lr a step. Gradient "
                                                 "methods only. See unlearning.sophia.")
    sophia_gamma: float = Field(0.04, gt=0, allow_inf_nan=False, description="Sophia: gamma in lr * clip(m / "
                                "max(gamma * h, eps), 1); larger: shorter Newton steps, fewer weights clipped.")
    sophia_hessian: Literal["gnb", "hutchinson"] = Field("gnb", description="Sophia: the diagonal Hessian "
                                                         "estimate. gnb: Gauss-Newton-Bartlett, labels sampled from "
                                                         "the model on the forget batch (one more forward and "
                                                         "backward); hutchinson: u * (H u) of the forget loss, u "
                                                         "Rademacher (a double backward).")
    sophia_every: int = Field(1, ge=1, description="Sophia: estimate the diagonal Hessian every this many steps (k).")
    harden: Literal["none", "Q8_0", "Q5_0", "Q4_1", "Q4_0"] = Field(
        "none", description="Quantization-aware unlearning (an attack in the loop): at every calibration also audit "
        "the weights round-tripped through this GGUF format; a forget sequence extractable or verbatim there keeps "
        "getting the forget gradient, taken at those weights (straight through), until it is not. Gradient "
        "methods; not with --lora. See unlearning.target.")
    lora: int = Field(0, ge=0, description="LoRA rank (0: train the weights themselves); merged on save.")
    mask_fraction: float = Field(0.0, ge=0, le=1, description="Train only this fraction of weights, those with the "
                                 "largest forget gradient (0: all).")
    localize: str | None = Field(None, description="causal:K: locate, then unlearn. Causal tracing (Meng et al. "
                                 "2022) ranks the layers by how much of the forget continuations' probability "
                                 "restoring their MLP output brings back under noised prefixes; only the MLPs of "
                                 "the K top layers train (with --lora, only their adapters). The per-layer effects "
                                 "go to localization.json. none: every layer. Default: the method's (hinge: "
                                 "causal:6; the others: none). Gradient methods only. See unlearning.localize.")
    max_utility_drop: float = Field(0.10, gt=0, description="Stop and restore the best step when retain MA falls "
                                    "or general perplexity rises by more than this (relative).")
    recalibrate_every: int = Field(5, ge=1, description="Re-measure the holdout band every this many steps.")
    guard_every: int = Field(10, ge=1, description="Check utility every this many steps.")
    checkpoint_every: int = Field(10, ge=1, description="Save a resumable checkpoint every this many steps.")
    tv_epochs: int = Field(4, ge=1, description="ta/tau: epochs of fine-tuning on F that make the task vector.")
    max_lambda: float = Field(4.0, gt=0, description="ta/tau: the largest lambda the line search tries (--stop "
                              "steps: the lambda).")
    seed: int = 0
    audit: AuditSettings = Field(default_factory=AuditSettings)
    _localize_given: bool = PrivateAttr(True)

    @field_validator("method")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in METHODS:
            raise InputError(f"--method {name!r}: unknown; choose one of {', '.join(METHODS)}")
        return name

    @field_validator("method_args")
    @classmethod
    def _options(cls, args: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """Checked against the method's options; InputError naming the method and the key otherwise."""
        if "method" not in info.data:  # the method itself was invalid: that error is reported
            return args
        return METHODS[info.data["method"]].validate(args)

    @field_validator("localize", mode="before")
    @classmethod
    def _localize(cls, value: Any) -> str | None:
        return parse_localize(value)

    @model_validator(mode="after")
    def _method_localize(self) -> LoopSettings:
        """An unset --localize is the method's: the settings record what runs."""
        self._localize_given = self.localize is not None
        if self.localize is None:
            self.localize = self.spec.localize
        return self

    @model_validator(mode="after")
    def _harden_without_lora(self) -> LoopSettings:
        if self.harden != "none" and self.lora:
            raise InputError(f"--harden {self.harden} with --lora {self.lora}: quantization acts on the merged "
                             "weights, which LoRA does not train; use one or the other")
        return self

    @property
    def spec(self) -> MethodSpec:
        return METHODS[self.method]

    @property
    def localize_given(self) -> bool:
        """Whether --localize was given (else it is the method's default)."""
        return self._localize_given

    @property
    def localized(self) -> str | None:
        """causal:K when only K layers' MLPs train, else None."""
        return localized(self.localize, self.spec.localize)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else self.spec.lr

    @property
    def aim_margin(self) -> float:
        return self.margin if self.margin is not None else self.spec.margin

    @property
    def retain_kind(self) -> str:
        return self.retain_loss if self.retain_loss is not None else self.spec.retain_loss
