"""RMU (Li et al. 2024, WMDP): scramble a middle layer's activations on forget text, keep them on retain.

    loss = (1 / (N_F * d)) * sum_{b,t} m_F[b,t] * ||h_l(x_F)[b,t] - c * u||^2
         + alpha * (1 / (N_R * d)) * sum_{b,t} m_R[b,t] * ||h_l(x_R)[b,t] - h_l^orig(x_R)[b,t]||^2

u is a fixed random unit vector, c the steering coefficient, h_l the hidden state (width d) after layer l,
m the attention masks (N_F, N_R: the real tokens of the forget and the retain batch), h^orig the original
model's. So: the mean squared error per hidden unit over every real token (including the first, which no
other loss counts), on F toward c * u and on R toward the original. Only the MLP weights of a few layers up
to l are trained, so the rest of the network is untouched.
"""

from __future__ import annotations

import torch
from pydantic import Field

from ...measure.tracing import decoder_layers, mlp_of
from ..context import TOKENS, Batch, Context
from .base import GradientMethod, MethodConfig, MethodSpec


class RMUConfig(MethodConfig):
    layer: int = Field(-1, ge=-1, description="Layer l whose output is steered; -1 picks the middle layer.")
    steering_coeff: float = Field(20.0, gt=0, description="c: the norm of the random target activation.")
    alpha: float = Field(10.0, ge=0, description="Weight of keeping retain activations as they were.")
    trainable_layers: int = Field(3, ge=1, description="How many layers (ending at `layer`) have their MLP "
                                  "weights trained.")
    seed: int = Field(0, description="Seed of the random direction u.")


class RMU(GradientMethod):
    Config = RMUConfig
    averages_over = TOKENS

    def __init__(self, config: RMUConfig | None = None, tokenizer=None) -> None:
        super().__init__(config, tokenizer)
        self.target: torch.Tensor | None = None

    def layer_index(self, model) -> int:
        n = len(decoder_layers(model))
        return n // 2 if self.config.layer < 0 else min(self.config.layer, n - 1)

    def trainable(self, model) -> list[torch.nn.Parameter]:
        """The MLP weights of the few layers up to the steered one; everything else stays frozen."""
        layers, last = decoder_layers(model), self.layer_index(model)
        chosen = layers[max(0, last - self.config.trainable_layers + 1) : last + 1]
        return [p for layer in chosen for p in mlp_of(layer).parameters()]

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


SPECS = [
    MethodSpec("rmu", "steer a middle layer's activations on F to a random direction, keep them on R (WMDP)", (RMU,),
               lr=5e-5),
]
