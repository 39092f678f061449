"""Locate first, then unlearn (`--localize causal:K`): causal tracing ranks the layers by how much of the forget
set's continuations their MLP carries (`measure.tracing`), and only the MLPs of the K top-ranked layers train.

What trains is the MLP of each chosen layer (its gate, up and down projections: what causal tracing restores,
and where ROME's localization puts stored associations), with --lora only the adapters on those projections.
The per-layer effects, the ranking and the chosen layers go to `localization.json` in the run folder; a resumed
run (and a later stage of the same method) reads the layers from there instead of tracing again.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..errors import InputError
from ..io.files import atomic_write_text
from ..measure.tracing import causal_trace, decoder_layers, mlp_of
from .context import Context, TokenSets

LOCALIZATION = "localization.json"
SPEC = re.compile(r"causal:(\d+)")


def parse_localize(value: str | None) -> str | None:
    """'causal:K' (K >= 1) as given, 'none' for none (every layer), None when not given (the method's default);
    InputError otherwise."""
    if value is None:
        return None
    if str(value).strip().lower() in ("", "none"):
        return "none"
    text = str(value).strip()
    match = SPEC.fullmatch(text)
    if not match or int(match.group(1)) < 1:
        raise InputError(f"--localize {text!r}: expected causal:K, K >= 1 the number of layers to unlearn "
                         "(or none)")
    return f"causal:{int(match.group(1))}"


def localized(value: str | None, default: str = "none") -> str | None:
    """The 'causal:K' that runs for a parsed --localize `value` (None: the method's `default`), None when every
    layer trains."""
    spec = default if value is None else value
    return None if spec == "none" else spec


def layer_count(spec: str) -> int:
    """K of 'causal:K'."""
    return int(spec.split(":")[1])


def localized_layers(ctx: Context, spec: str, tokens: TokenSets, prefix_tokens: int, seed: int, batch_size: int,
                     work: Path | None = None, write: bool = True) -> list[int]:
    """The K layers causal tracing ranks first on `tokens.forget` (fewer when the model has fewer), ascending.
    Traces `ctx.model` and writes `work/localization.json` (when `write`), or reads the layers from that file
    when it is already there."""
    path = None if work is None else Path(work) / LOCALIZATION
    if path is not None and path.is_file():
        return list(json.loads(path.read_text())["trained_layers"])
    tracing = causal_trace(ctx.model, tokens.forget, prefix_tokens, ctx.runtime, seed=seed, batch_size=batch_size,
                           pad_id=ctx.pad_id)
    layers = sorted(tracing.ranking()[: layer_count(spec)])
    if path is not None and write:
        record = {"localize": spec, "trained_layers": layers, "trained": "mlp",
                  **tracing.to_json(tokens.forget_names)}
        atomic_write_text(path, json.dumps(record, indent=1) + "\n")
    return layers


def restrict_to_mlps(model, layers: list[int]) -> None:
    """Freeze every parameter outside the MLPs of `layers` (those inside keep their requires_grad: under LoRA
    only the adapters train)."""
    blocks = decoder_layers(model)
    keep = {id(p) for layer in layers for p in mlp_of(blocks[layer]).parameters()}
    for param in model.parameters():
        param.requires_grad_(param.requires_grad and id(param) in keep)


def check_trainable(params: list[torch.nn.Parameter], spec: str, layers: list[int]) -> None:
    if not params:
        raise InputError(f"--localize {spec}: layers {layers} hold none of the parameters this method trains")
