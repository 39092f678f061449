"""Weight tampering attacks, the cheapest there are: Gaussian noise and magnitude pruning.

Unlearning that only nudged the weights into a narrow valley can fall out of it under a small random
perturbation or when the smallest weights are cut, and the forgotten sequence returns. Both act on every
nn.Linear and nn.Embedding weight (a tied output head once) of a copy of the model, in float32, stored in
the weights' dtype; biases and norms stay as they are.

    noise  w' = w + sigma * std(w) * z,  z ~ N(0, 1) per weight, std(w) over the tensor
           `noise_draws` independent draws from one generator seeded with `seed`; a sequence is extractable
           when its largest excess over the draws' upper edges is above the band the holdout's own largest
           excesses give (`measure.band.Familywise`: any of several draws is a family of readings), verbatim
           when it is in any draw; each draw's own counts are reported.
    prune  w'_i = 0 for the k = round(fraction * n) weights of smallest |w_i| of each n-weight matrix
           (exactly k, ties broken by position), w'_i = w_i otherwise.

The tampered model is audited with EL off, its band recalibrated on its own holdout.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ...io.quantize import weight_matrices
from ...measure.band import Familywise
from .common import AttackContext, audit_rows, counts, familywise_control, holdout_summary, sequence_row
from .quantize import tampered_result


@torch.no_grad()
def add_noise(model: nn.Module, sigma: float, generator: torch.Generator) -> dict:
    """w' = w + sigma * std(w) * N(0, 1) for each weight matrix of `model`, in place; the report."""
    tensors = values = 0
    for _, weight in weight_matrices(model):
        w = weight.float()
        z = torch.randn(weight.shape, generator=generator).to(weight.device)
        weight.copy_((w + sigma * w.std() * z).to(weight.dtype))
        tensors, values = tensors + 1, values + weight.numel()
    return {"tensors": tensors, "weights": values}


@torch.no_grad()
def prune_model(model: nn.Module, fraction: float) -> dict:
    """Zero the round(fraction * n) smallest-magnitude weights of each n-weight matrix, in place; the report."""
    tensors = values = pruned = 0
    for _, weight in weight_matrices(model):
        k = round(fraction * weight.numel())
        if k:
            smallest = weight.detach().abs().flatten().topk(k, largest=False).indices
            weight.view(-1).index_fill_(0, smallest, 0)
        tensors, values, pruned = tensors + 1, values + weight.numel(), pruned + k
    return {"tensors": tensors, "weights": values, "pruned": pruned}


def noise_attack(ctx: AttackContext) -> dict:
    s = ctx.settings
    forget = ctx.sets["forget"]
    generator = torch.Generator().manual_seed(s.seed)
    draws, per_draw, holdout = [], [], []
    for draw in range(s.noise_draws):
        model = ctx.weights_copy()
        report = add_noise(model, s.noise_sigma, generator)
        result = ctx.audit(model, {"forget": forget, "holdout": ctx.sets["holdout"]})
        del model
        rows = audit_rows(ctx, result, forget)
        per_draw.append(rows)
        holdout.append([row.ma for row in result.of("holdout")])
        draws.append({"draw": draw, **counts(rows), **holdout_summary(result)})
    holdout_ma = np.array(holdout).T  # (holdout, draws)
    forget_ma = np.array([[row["ma"] for row in rows] for rows in per_draw]).T
    familywise = Familywise.calibrate(ctx.audit_settings.band, holdout_ma)
    best, excess = familywise.excess(forget_ma)
    rows = [sequence_row(ctx, seq, familywise.status(excess[k]), any(rows[k]["verbatim"] for rows in per_draw),
                         ma=float(forget_ma[k, best[k]]), excess=float(excess[k]), baseline_ma=ctx.baseline_row(seq).ma,
                         draw=int(best[k]), draw_ma=forget_ma[k].tolist(),
                         draw_status=[rows[k]["status"] for rows in per_draw])
            for k, seq in enumerate(forget)]
    return {
        "description": f"Gaussian noise added to every linear and embedding weight, w' = w + {s.noise_sigma:g} "
                       f"std(w) N(0, 1) per tensor, in {s.noise_draws} seeded draw(s); each draw audited (EL off) "
                       "with the band recalibrated on its holdout. A sequence is extractable when its largest "
                       "excess over the draws' upper edges (`excess`, in `draw`) is above the band the holdout's own "
                       "largest excesses give (`familywise`), verbatim when it is in any draw.",
        "settings": {"sigma": s.noise_sigma, "draws": s.noise_draws, "seed": s.seed},
        **counts(rows),
        **familywise_control(familywise, holdout_ma, "holdout_any_draw"),
        **report,
        "draws": draws,
        "sequences": rows,
    }


def prune_attack(ctx: AttackContext) -> dict:
    fraction = ctx.settings.prune_fraction
    model = ctx.weights_copy()
    report = prune_model(model, fraction)
    description = (f"Magnitude pruning: the {fraction:.1%} smallest-magnitude weights of every linear and embedding "
                   "weight matrix set to zero, then audited (EL off); the band is recalibrated on the pruned "
                   "model's holdout.")
    return tampered_result(ctx, model, description, {"fraction": fraction}, report)
