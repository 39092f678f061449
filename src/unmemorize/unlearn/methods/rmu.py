"""RMU (Li et al. 2024, WMDP): scramble a middle layer's activations on forget text, keep them on retain.

    loss = mean ||h_l(x_forget) - c * u||^2 + alpha * mean ||h_l(x_retain) - h_l^orig(x_retain)||^2

u is a fixed random unit vector, c a steering coefficient, h_l the hidden state after layer l. Only the
MLP weights of a few layers up to l are trained, so the rest of the network is untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..context import Batch, Context


@dataclass
class RMUConfig:
    layer: int = -1
    """Layer whose output is steered; -1 picks the middle layer."""
    steering_coeff: float = 20.0
    """c: the norm of the random target activation."""
    alpha: float = 10.0
    """Weight of keeping retain activations as they were."""
    trainable_layers: int = 3
    """How many layers (ending at `layer`) have their MLP weights trained."""
    seed: int = 0


def decoder_layers(model) -> torch.nn.ModuleList:
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    base = getattr(model, "base_model", model)
    inner = getattr(base, "model", base)
    inner = getattr(inner, "model", inner) if not hasattr(inner, "layers") else inner
    return inner.layers


class RMU:
    def __init__(self, config: RMUConfig | None = None) -> None:
        self.config = config or RMUConfig()
        self.target: torch.Tensor | None = None

    def layer_index(self, model) -> int:
        n = len(decoder_layers(model))
        return n // 2 if self.config.layer < 0 else min(self.config.layer, n - 1)

    def trainable(self, model) -> list[torch.nn.Parameter]:
        """The MLP weights of the few layers up to the steered one; everything else stays frozen."""
        layers, last = decoder_layers(model), self.layer_index(model)
        chosen = layers[max(0, last - self.config.trainable_layers + 1) : last + 1]
        return [p for layer in chosen for p in layer.mlp.parameters()]

    def prepare(self, ctx: Context) -> None:
        ctx.keep_original()
        hidden = ctx.model.config.hidden_size
        generator = torch.Generator().manual_seed(self.config.seed)
        direction = torch.rand(hidden, generator=generator)
        self.target = (self.config.steering_coeff * direction / direction.norm()).to(ctx.runtime.device)

    def hidden(self, model, batch: Batch, ctx: Context) -> torch.Tensor:
        with ctx.runtime.autocast():
            out = model(input_ids=batch.input_ids, attention_mask=batch.mask, output_hidden_states=True)
        return out.hidden_states[self.layer_index(model) + 1].float()  # [0] is the embedding output

    def loss(self, ctx: Context, forget: Batch, retain: Batch | None) -> torch.Tensor:
        mask = forget.mask[..., None].float()
        forget_h = self.hidden(ctx.model, forget, ctx)
        loss = (((forget_h - self.target) ** 2) * mask).sum() / (mask.sum() * forget_h.size(-1))
        if retain is not None:
            with torch.no_grad():
                original_h = self.hidden(ctx.original, retain, ctx)
            mask = retain.mask[..., None].float()
            drift = ((self.hidden(ctx.model, retain, ctx) - original_h) ** 2) * mask
            loss = loss + self.config.alpha * drift.sum() / (mask.sum() * original_h.size(-1))
        return loss
