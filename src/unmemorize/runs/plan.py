"""Memory planning (`unmemorize plan`): what an `unlearn` run needs on each device, from the model's config alone.

The model is built on PyTorch's `meta` device (shapes, no storage, no weights read), so the parameter counts
are exact for any architecture transformers knows; LoRA adapters are counted by peft on that same meta model.
What the loop keeps and when is read off `unlearning/loop.py` (and the methods); the activation coefficients
were measured on transformers' Llama decoder layer (SDPA attention; Qwen, Mistral and SmolLM share it) with
saved-tensor hooks, and the whole is checked against the measured peak memory of real runs
(`tests/test_plan.py`). It estimates the bytes of tensors: an allocator keeps some more (the CUDA caching
allocator's fragmentation; glibc's heap on a CPU), so leave a margin.

Shapes (`Shape`): P every parameter (tied ones once); P_mm the weights of the matrix multiplications (every
Linear, the output head included even when tied to the embeddings); P_t the trained parameters (all; a method's
own subset, rmu; under `--lora r` the adapters, as peft makes them for `all-linear`; under `--localize causal:K`,
hinge's default, those in K layers' MLPs); L layers, h hidden size,
i MLP size, V vocabulary; P_u the largest decoder layer, P_root the parameters outside the layers.

Bytes (`Precision`, as `io.models.make_runtime` chooses): w of a weight (4 under `--dtype auto` and `float32`,
2 under `bfloat16`); t of a trained parameter (w; 4 for LoRA adapters, which peft keeps in float32); the bf16
autocast of `auto` where the hardware is fast (a CUDA GPU: assumed Ampere or later; a CPU with AVX-512 BF16 or
AMX) and of `bfloat16`.

Per device, with D devices: S = D under FSDP (parameters, gradients, Adam and best state sharded: the loop's
`unlearning.fsdp`), else S = 1. Every term is a tensor the run holds:

    weights        P w / S (+ the LoRA adapters' P_t t / S)
    reference      P w / S  when the run keeps a frozen copy of the model (`Context.keep_original`): the kl retain
                   loss, --neighbours, rmu, undial. NPO's reference is its precomputed log-probs (a number per
                   sequence), not a model
    gradients      P_t t / S (DDP: twice, its gradient buckets; torch's default gradient_as_bucket_view=False)
    Adam states    2 P_t t / S  (exp_avg, exp_avg_sq, in the parameter's dtype)
    best state     P_t t / S  (the loop's `snapshot(params)`, restored by the utility guard)
The peak adds the largest of the moments that come and go (each on top of the terms above):
    step           the gradient step:
    - activations  sum over the gradient batches of one step, all held until its one backward:
                   n [L (a_h h + a_i i) + 12 h + 4 V k]  bytes for a batch of n = b T tokens
                   (a_h, a_i) = (41, 16) float32, (38, 8) bf16 autocast over float32 weights, (24, 8) bfloat16
                   weights (measured per decoder layer: the residual stream, the norms, q/k/v, the attention
                   output, the gated MLP's four i-sized tensors); 12 h the final norm; 4 V k the float32 log-softmax
                   the loss keeps for its backward, k = 1 (k = 2 for a KL batch: the original's log-probs too; 0
                   for rmu, whose loss reads hidden states). Batches: the forget shard b = ceil(B / D) sequences
                   of T tokens; the retain batch R when the retain loss is nll or kl (rmu: always, when a retain set
                   is given); the neighbour batch R with --neighbours
    - logits       2 n V 4 (+ n V 2 under autocast): the float32 logits and one more vocabulary-sized tensor at
                   the loss (hinge's rival margins; the log-softmax's gradient in the backward), n the largest batch
    - copies       under bf16 autocast over float32 weights 2 P_mm per gradient batch: autocast's bf16 copy of
                   every weight, which the backward needs (each forward of the step keeps its own)
    - FSDP         (P_root + 2 P_u) w + P_u t: the gathered root unit, the layer being computed and the next one,
                   and one layer's unsharded gradient
    scoring        s T V c (+ 2 P_mm under autocast, but with LoRA): a no-grad forward of s = --score-batch
                   sequences, the per-step scoring of the forget set and the utility guard's (c: 2 under autocast,
                   else 4; autocast keeps its copies of weights that require grad for the whole forward)
    best state     P_t t / S: the guard's new snapshot is made before the old one is let go
    embeddings     2 V h t when the embeddings train: their dense gradient and its accumulation
    optimizer      CUDA: P_t t / S (the foreach Adam's sqrt of every exp_avg_sq at once); CPU: 2x the largest
                   trained tensor (one parameter at a time)
Phases outside the loop, with the whole model on every device (FSDP shards only the gradient loop):
    audit          P w + s T V c (+ 2 P_mm under autocast)  (before and after the loop)
    task vector    6 P w + the activations of a fine-tuning batch of s sequences + 2 s T V 4: ta, tau and
                   sgatau's second stage fine-tune a copy (the weights, the original copy kept to subtract from,
                   the tuned copy, its gradients, AdamW's two states), in every process, FSDP or not.
Not covered: --sam-rho (one more best-state-sized copy), --optimizer sophia, --harden (a quantized
copy), --mask-fraction (one mask per trained weight: + P_t t), EL decoding.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import InputError
from ..io.models import read_config
from ..measure.tracing import decoder_layers, mlp_of
from ..unlearning.localize import layer_count, localized, parse_localize
from ..unlearning.methods import METHODS, GradientMethod

GIB = 2**30
ACCELERATE_CONFIGS = Path("docs/accelerate")

# bytes per token per decoder layer: a_h * h + a_i * i (see the module docstring)
ACTIVATION_COEFFICIENTS = {"float32": (41, 16), "autocast": (38, 8), "bfloat16": (24, 8)}
# What a device holds before any tensor of the run: the CUDA context (a usual size, not measured here); on a CPU the
# process with torch, transformers and unmemorize imported (measured: about 0.5 GiB resident)
RUNTIME = {"cuda": GIB // 2, "cpu": GIB // 2}


class PlanSettings(BaseModel):
    """What `unmemorize plan` plans for: the options of the `unlearn` run and the devices it would run on."""

    model_config = ConfigDict(extra="forbid")

    method: str = Field("hinge", description="A name from `unmemorize methods`.")
    lora: int = Field(0, ge=0, description="LoRA rank (0: the weights themselves train).")
    localize: str | None = Field(None, description="causal:K: only the MLPs of K layers train (the largest K); "
                                 "none: every layer; default: the method's (hinge: causal:6).")
    devices: int = Field(1, ge=1, description="Devices (GPUs, or processes on a CPU) the run would use.")
    batch: int = Field(12, ge=1, description="Forget sequences that get gradient in one step (the loop puts every "
                       "active sequence of the request in one batch, split over the devices).")
    length: int = Field(256, ge=2, description="Tokens per sequence (`--max-tokens` truncates to it).")
    retain_batch: int = Field(12, ge=1, description="Retain sequences per step (`retain_batch:` in an unlearn "
                              "--config), and as many neighbours.")
    retain_loss: Literal["none", "nll", "kl"] | None = Field(None, description="The retain regularizer (default: "
                                                             "the method's).")
    neighbours: bool = Field(False, description="Whether the run gets --neighbours (a KL batch to the original).")
    score_batch: int = Field(8, ge=1, description="Sequences per no-grad forward pass (`--batch-size`).")
    device: Literal["cuda", "cpu"] = Field("cuda", description="The kind of device planned for.")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="As `unlearn --dtype`.")
    device_memory: float | None = Field(None, gt=0, description="Memory of one device in GiB (default: the first "
                                        "CUDA device's here, else this machine's RAM).")

    @field_validator("localize", mode="before")
    @classmethod
    def _localize(cls, value: Any) -> str | None:
        return parse_localize(value)

    @property
    def localized(self) -> str | None:
        """causal:K when only K layers' MLPs train (given, or the method's default), else None."""
        return localized(self.localize, METHODS[self.method].localize if self.method in METHODS else "none")


@dataclass(frozen=True)
class Precision:
    name: str  # float32 | autocast | bfloat16: the row of ACTIVATION_COEFFICIENTS
    weight: int  # bytes of a weight
    compute: int  # bytes of a logit in the forward pass
    autocast: bool  # bf16 autocast over float32 weights (copies of the weights)

    @classmethod
    def of(cls, device: str, dtype: str) -> Precision:
        if dtype == "float32":
            return cls("float32", 4, 4, False)
        if dtype == "bfloat16":
            return cls("bfloat16", 2, 2, False)
        fast = True if device == "cuda" else _cpu_bf16_is_fast()
        return cls("autocast", 4, 2, True) if fast else cls("float32", 4, 4, False)


def _cpu_bf16_is_fast() -> bool:
    from ..io.models import make_runtime

    return make_runtime("cpu", "auto").compute is not None


@dataclass(frozen=True)
class Shape:
    """What the formulas read from the config and the meta model."""

    model_type: str
    layer_class: str | None
    params: int
    matmul_params: int
    trained: int
    largest_trained: int
    adapters: int
    embeddings_train: bool
    layer_params: int
    root_params: int
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    context: int | None


def model_shape(config, method: str, lora: int, trust_remote_code: bool = False, localize: str | None = None) -> Shape:
    """Count parameters on a model built on the meta device: every one, the matmul weights, the trained ones (the
    method's subset, or the LoRA adapters peft adds; with `localize` causal:K only those in the MLPs of the K
    layers whose MLPs are largest, as causal tracing picks K layers only the run can tell), the largest decoder
    layer and what lies outside the layers."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..io.models import context_length

    quiet = logging.getLogger("transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"model {config.model_type}: cannot build it from its config: {first}") from None
    finally:
        quiet.setLevel(level)
    params = sum(p.numel() for p in model.parameters())
    matmul = sum(module.weight.numel() for module in model.modules() if _is_matmul(module))
    layers = decoder_layers(model)
    layer_params = max((sum(p.numel() for p in layer.parameters()) for layer in layers), default=0)
    in_layers = sum(p.numel() for layer in layers for p in layer.parameters())
    embedding = model.get_input_embeddings().weight
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = _field(text, "hidden_size", "n_embd", "d_model")
    intermediate = _field(text, "intermediate_size", "n_inner", "ffn_dim") or 4 * hidden
    adapters = 0
    mlps = None
    if localize is not None and all(mlp_of(layer) is not None for layer in layers):  # else: every layer trains
        blocks = sorted((mlp_of(layer) for layer in layers),
                        key=lambda mlp: -sum(p.numel() for p in mlp.parameters()))
        mlps = blocks[: layer_count(localize)]
    if lora:
        from peft import LoraConfig, get_peft_model

        with torch.device("meta"), warnings.catch_warnings():  # peft's deprecation notes are not the user's
            warnings.simplefilter("ignore")
            model = get_peft_model(model, LoraConfig(r=lora, lora_alpha=2 * lora, lora_dropout=0.0,
                                                     target_modules="all-linear"))
        chosen = [p for p in model.parameters() if p.requires_grad]
        adapters = sum(p.numel() for p in chosen)
    else:
        stage = next((s for s in METHODS[method].stages if issubclass(s, GradientMethod)), None)
        subset = stage().trainable(model) if stage is not None else None
        chosen = list(model.parameters()) if subset is None else subset
    if mlps is not None:  # peft wraps the Linears inside the MLP modules, which then hold their adapters
        inside = {id(p) for mlp in mlps for p in mlp.parameters()}
        chosen = [p for p in chosen if id(p) in inside]
    return Shape(
        model_type=config.model_type, layer_class=type(layers[0]).__name__ if len(layers) else None,
        params=params, matmul_params=matmul, trained=sum(p.numel() for p in chosen),
        largest_trained=max((p.numel() for p in chosen), default=0), adapters=adapters,
        embeddings_train=any(p is embedding for p in chosen), layer_params=layer_params,
        root_params=params - in_layers, layers=len(layers), hidden=hidden, intermediate=intermediate,
        vocab=model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None
        else _field(text, "vocab_size"),
        context=context_length(config))


def _is_matmul(module) -> bool:
    import torch

    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"  # GPT-2's Linear


def _field(config, *names: str) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return 0


def keeps_reference(method: str, retain_kind: str, neighbours: bool) -> bool:
    """Whether the run holds a frozen copy of the model (`Context.keep_original`): the loop keeps one for the kl
    retain loss and for --neighbours; rmu (its retain activations) and undial (its teacher) keep one in `prepare`."""
    from ..unlearning.methods.rmu import RMU
    from ..unlearning.methods.undial import Undial

    stages = METHODS[method].stages
    return retain_kind == "kl" or neighbours or any(issubclass(s, (RMU, Undial)) for s in stages)


@dataclass(frozen=True)
class Layout:
    """The memory of one way to run on the devices: persistent terms, the moments that come and go, the peak."""

    name: str  # single | ddp | fsdp
    devices: int
    terms: dict[str, int]  # bytes per device, held through the loop
    moments: dict[str, int]  # bytes per device on top of the terms, one at a time
    phases: dict[str, int]  # bytes per device of the phases outside the loop: the audits, a task vector
    runtime: int  # bytes of the process or the CUDA context, before any tensor
    step: dict[str, int]  # the gradient step's moment in parts: activations, logits, autocast copies, FSDP units

    @property
    def tensors(self) -> int:
        """The peak of the tensors: the loop's terms and its largest moment, or a phase outside it."""
        return max(sum(self.terms.values()) + max(self.moments.values(), default=0), *self.phases.values())

    @property
    def peak(self) -> int:
        return self.tensors + self.runtime

    def to_json(self) -> dict:
        return {**asdict(self), "tensors": self.tensors, "peak": self.peak}


@dataclass(frozen=True)
class Plan:
    model: str
    settings: PlanSettings
    shape: Shape
    precision: Precision
    layouts: list[Layout]
    device_memory: int  # bytes
    device_memory_source: str
    choice: str | None  # the layout recommended (None: none fits)
    command: str

    def to_json(self) -> dict:
        return {"model": self.model, "settings": self.settings.model_dump(), "shape": asdict(self.shape),
                "precision": asdict(self.precision), "layouts": {lay.name: lay.to_json() for lay in self.layouts},
                "device_memory": self.device_memory, "device_memory_source": self.device_memory_source,
                "recommended": self.choice, "command": self.command}


def plan(model: str, settings: PlanSettings, trust_remote_code: bool = False) -> Plan:
    """The memory per device of an `unlearn` run of `model` with `settings`, alone and (with several devices) under
    DDP and under FSDP, and the launch command of the first layout that fits. A --length over the model's context
    is planned at the context (the run truncates to it)."""
    if settings.method not in METHODS:
        raise InputError(f"--method {settings.method!r}: unknown; choose one of {', '.join(METHODS)}")
    config = read_config(model, trust_remote_code)
    shape = model_shape(config, settings.method, settings.lora, trust_remote_code, settings.localized)
    if shape.context is not None and settings.length > shape.context:  # the run truncates to the context
        settings = settings.model_copy(update={"length": shape.context})
    precision = Precision.of(settings.device, settings.dtype)
    layouts = [layout("single", 1, shape, precision, settings)]
    if settings.devices > 1:
        layouts += [layout("ddp", settings.devices, shape, precision, settings),
                    layout("fsdp", settings.devices, shape, precision, settings)]
    memory, source = device_memory(settings)
    fitting = [lay for lay in layouts if lay.peak <= memory and lay.devices == settings.devices]
    choice = fitting[0].name if fitting else None
    return Plan(model, settings, shape, precision, layouts, memory, source, choice,
                launch_command(model, settings, shape, choice or ("fsdp" if settings.devices > 1 else "single")))


def layout(name: str, devices: int, shape: Shape, precision: Precision, settings: PlanSettings) -> Layout:
    """The terms of the module docstring for one layout (single: one device; ddp, fsdp: `devices` of them)."""
    spec = METHODS[settings.method]
    retain_kind = settings.retain_loss or spec.retain_loss
    gradient = any(issubclass(s, GradientMethod) for s in spec.stages)
    task_vector = any(not issubclass(s, GradientMethod) for s in spec.stages)
    w, c = precision.weight, precision.compute
    t = 4 if settings.lora else w  # peft keeps adapters in float32 over bf16 weights
    shards = devices if name == "fsdp" else 1
    P, Pt, T, V, h = shape.params, shape.trained, settings.length, shape.vocab, shape.hidden
    logits = settings.score_batch * T * V * c
    copies = 2 * shape.matmul_params if precision.autocast else 0  # autocast caches the casts of trained weights
    phases = {"audit": P * w + shape.adapters * t + logits + copies}
    scoring = logits + (0 if settings.lora else copies)  # in the loop LoRA's base weights are frozen: cast per op

    terms = {"weights": (P * w + shape.adapters * t) // shards}
    moments: dict[str, int] = {}
    step_parts: dict[str, int] = {}
    if gradient:
        terms["reference"] = ((P * w + shape.adapters * t) // shards
                              if keeps_reference(settings.method, retain_kind, settings.neighbours) else 0)
        terms["gradients"] = Pt * t // shards
        if name == "ddp":
            terms["DDP gradient buckets"] = Pt * t
        terms["Adam states"] = 2 * Pt * t // shards
        terms["best state"] = Pt * t // shards
        batches = gradient_batches(settings, devices, retain_kind)
        largest = max(n for n, _ in batches)
        step = {"activations": sum(activations(shape, precision, n, kind) for n, kind in batches),
                "logits at the loss": largest * V * (8 + (2 if precision.autocast else 0)),
                "autocast weight copies": 2 * shape.matmul_params * len(batches) if precision.autocast else 0,
                "FSDP gathered units": ((shape.root_params + 2 * shape.layer_params) * w + shape.layer_params * t
                                        if name == "fsdp" else 0)}
        step_parts = {key: value for key, value in step.items() if value}
        moments = {"step": sum(step.values()), "scoring": scoring, "new best state": Pt * t // shards,
                   "embedding gradient": 2 * V * h * t if shape.embeddings_train else 0,
                   "optimizer step": Pt * t // shards if settings.device == "cuda" else 2 * shape.largest_trained * t}
    if task_vector:  # a fine-tuned copy, its gradients and AdamW, and the original weights kept to subtract from
        phases["task vector"] = (6 * P * w + activations(shape, precision, settings.score_batch * T, "logits")
                                 + settings.score_batch * T * V * 8)
    return Layout(name, devices, terms, moments, phases, RUNTIME[settings.device], step_parts)


def gradient_batches(settings: PlanSettings, devices: int, retain_kind: str) -> list[tuple[int, str]]:
    """(tokens, kind) of every batch whose activations one step holds until its backward: the forget shard, the
    retain batch (nll: logits; kl: logits and the original's; rmu: hidden states), the neighbour batch (kl)."""
    from ..unlearning.methods.rmu import RMU

    rmu = any(issubclass(s, RMU) for s in METHODS[settings.method].stages)
    T = settings.length
    batches = [(math.ceil(settings.batch / devices) * T, "hidden" if rmu else "logits")]
    if rmu:
        batches.append((settings.retain_batch * T, "hidden"))
    elif retain_kind in ("nll", "kl"):
        batches.append((settings.retain_batch * T, "kl" if retain_kind == "kl" else "logits"))
    if settings.neighbours:
        batches.append((settings.retain_batch * T, "kl"))
    return batches


def activations(shape: Shape, precision: Precision, tokens: int, kind: str) -> int:
    """n [L (a_h h + a_i i) + 12 h + 4 V k] bytes for n tokens (module docstring)."""
    a_h, a_i = ACTIVATION_COEFFICIENTS[precision.name]
    kept = {"logits": 1, "kl": 2, "hidden": 0}[kind]
    per_token = shape.layers * (a_h * shape.hidden + a_i * shape.intermediate) + 12 * shape.hidden
    return tokens * (per_token + 4 * shape.vocab * kept)


def device_memory(settings: PlanSettings) -> tuple[int, str]:
    """(bytes of one device, where that number comes from): --device-memory, else the first CUDA device here (when
    planning for CUDA), else this machine's RAM."""
    if settings.device_memory is not None:
        return int(settings.device_memory * GIB), "--device-memory"
    if settings.device == "cuda":
        import torch

        if torch.cuda.is_available():
            properties = torch.cuda.get_device_properties(0)
            return int(properties.total_memory), f"CUDA device 0 ({properties.name})"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's RAM"


def launch_command(model: str, settings: PlanSettings, shape: Shape, choice: str) -> str:
    """The command that runs the planned `unlearn`: plain, under `accelerate launch` with the DDP or FSDP config of
    docs/accelerate (on CUDA), or under torchrun (on a CPU, where `accelerate launch` starts one process)."""
    options = [f"--model {model}", f"--method {settings.method}"]
    if settings.lora:
        options.append(f"--lora {settings.lora}")
    if settings.localize:
        options.append(f"--localize {settings.localize}")
    if settings.dtype != "auto":
        options.append(f"--dtype {settings.dtype}")
    if settings.retain_loss:
        options.append(f"--retain-loss {settings.retain_loss}")
    options.append(f"--device {settings.device}")
    run = "unlearn " + " ".join(options) + " --forget F --holdout H --retain R --out run"
    if choice == "single":
        return f"unmemorize {run}"
    n = settings.devices
    if settings.device == "cpu":
        fsdp = "ACCELERATE_USE_FSDP=true " if choice == "fsdp" else ""
        return f"{fsdp}torchrun --standalone --nproc_per_node {n} -m unmemorize {run}"
    if choice == "ddp":
        return (f"accelerate launch --config_file {ACCELERATE_CONFIGS / 'ddp.yaml'} --num_processes {n} "
                f"-m unmemorize {run}")
    wrap = f" --fsdp_transformer_layer_cls_to_wrap {shape.layer_class}" if shape.layer_class else ""
    return (f"accelerate launch --config_file {ACCELERATE_CONFIGS / 'fsdp.yaml'} --num_processes {n}{wrap} "
            f"-m unmemorize {run}")


def plan_settings(**values) -> PlanSettings:
    """PlanSettings from the command line's values; InputError naming the option on a bad one."""
    try:
        return PlanSettings(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as error:
        first = error.errors()[0]
        option = str(first["loc"][0]).replace("_", "-") if first["loc"] else "?"
        raise InputError(f"--{option}: {first['msg']}") from None
