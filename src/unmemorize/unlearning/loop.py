"""The unlearning loop: measure every forget sequence, choose who gets gradient, step, check the stop rule.

Reads top to bottom. Each step:
  1. score every forget sequence (one batched forward, no gradient): MA and verbatim;
  2. check the target (`target.Target`): every `recalibrate_every` steps, and always before declaring the
     target reached, the band is re-measured on the holdout under the *current* model (unlearning moves
     unseen data too); stop when the stop rule is met or at max_steps (the rules: `target`'s docstring);
  3. select the sequences that get gradient (the method's selection: every one, or only those still above
     the band or verbatim, and under `--target indistinguishable` those under the loss band; never those
     over-unlearned on loss, except under `two_way`, which pulls them back; all against the bands moved in by
     `--margin`) and tell the method those bands (`ctx.step`);
  4. loss = forget loss + retain_weight * retain regularizer (+ neighbour_weight * KL to the original model
     on a batch of `--neighbours`, unseen in-domain text, when given); backward; Adam step (or Sophia's, which
     first refreshes its diagonal Hessian estimate on the forget batch every `--sophia-every` steps). With `--sam-rho`
     the forget loss's gradient is taken at the worst weights within that radius instead (`sam_gradient`); with
     `--harden` the sequences that come back under the quantized weights add theirs there (`harden_gradient`);
  5. log the step to trajectory.jsonl; every `guard_every` steps check utility and keep the best state;
     every `checkpoint_every` steps write a resumable checkpoint.
All randomness of a step derives from (seed, step), so a resumed run replays an uninterrupted one exactly.
The method is an object with `prepare(ctx)`, `loss(ctx, forget, retain)` and `averages_over` (what its loss
is a mean over); the loop knows nothing else of it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..io.quantize import weights_swapped
from ..measure.band import Band, LossBand
from ..measure.utility import utility, utility_drop
from ..progress import progress
from .checkpoint import load_checkpoint, save_checkpoint
from .context import Batch, Context, LoopOutcome, StepState, TokenSets
from .fsdp import Sharded, fsdp_requested, grad_norm
from .retain import retain_loss
from .sophia import Sophia, refresh_hessian, sophia_log
from .target import NOTHING_LEFT, TWO_WAY, Target, selected

if TYPE_CHECKING:
    from .config import LoopSettings

__all__ = ["LoopOutcome", "TokenSets", "gradient_unlearn"]

GradMask = dict[torch.nn.Parameter, torch.Tensor] | None
"""1 for the weights that train, 0 for those --mask-fraction freezes; None: all train."""


def gradient_unlearn(ctx: Context, objective, params: list[torch.nn.Parameter], settings: LoopSettings,
                     sets: TokenSets, work: Path, utility_before: dict, accelerator,
                     grad_mask: dict[torch.nn.Parameter, torch.Tensor] | None = None, *,
                     selection: str) -> LoopOutcome:
    """Train `params` on `objective` until the stop rule; `selection` (target.ALL, BAND or TWO_WAY) says which
    forget sequences get gradient."""
    with progress("unlearning", settings.max_steps, status="scoring the request",
                  enabled=accelerator.is_main_process) as update:

        def show(step: int, above: int) -> None:
            update(completed=step, status=f"{above} of {len(sets.forget)} above the band or verbatim")

        return _steps(ctx, objective, params, settings, sets, work, utility_before, accelerator, grad_mask, show,
                      selection)


def _steps(ctx: Context, objective, params: list[torch.nn.Parameter], settings: LoopSettings, sets: TokenSets,
           work: Path, utility_before: dict, accelerator, grad_mask, show, selection: str) -> LoopOutcome:
    model, audit = ctx.model, settings.audit
    # FSDP (`unlearning.fsdp`): the model sharded in place, `params` and `grad_mask` replaced by their shards
    sharded = Sharded.shard(ctx, params, grad_mask) if fsdp_requested(accelerator, settings) else None
    optimizer = make_optimizer(params, settings)
    objective.prepare(ctx)  # before DDP wraps the model (a DDP wrapper cannot be copied); FSDP shards it in place
    if settings.retain_kind == "kl" or sets.neighbours:
        ctx.keep_original()
    if sharded is None:
        model, optimizer = accelerator.prepare(model, optimizer)
        ctx.model = model

    state = (sharded.load_checkpoint if sharded else load_checkpoint)(work, model, optimizer)
    step = state.get("step", 0)
    target = Target(ctx, sets, settings, Band(**state["band"]) if "band" in state else None,
                    state.get("holdout_mean"), LossBand(**state["loss_band"]) if state.get("loss_band") else None,
                    pulls_back=selection == TWO_WAY, harden=settings.harden)
    best = state.get("best") or {"step": 0, "extractable": None, "weights": snapshot(params)}
    tokens_trained = state.get("tokens_trained", 0)
    trajectory = work / "trajectory.jsonl"
    if accelerator.is_main_process:
        keep_trajectory(trajectory, step)

    def finish(reason: str, restored: int | None = None) -> LoopOutcome:
        if accelerator.is_main_process and restored is None:
            log_step(trajectory, step, None, ma, sets.forget_names, target.band, above,
                     holdout_mean=target.holdout_mean, loss_band=_edges(target.loss_band))
        if sharded is not None:  # the full weights on every process again, as a plain module
            ctx.model = sharded.gather()
        return LoopOutcome(step, reason, target.band, tokens_trained, restored)

    while True:
        scores = target.score()
        check = target.check(scores, recalibrate=step % settings.recalibrate_every == 0)
        above = check.above
        ma = [s.ma for s in scores]
        show(step, len(above))
        reason = check.reason or target.out_of_steps(step)
        if reason:
            return finish(reason)
        active = selected(selection, above, len(sets.forget), check.over)
        hardened = target.hardened  # --harden: those that come back under the quantized weights get gradient too
        if not active and not hardened:
            return finish(NOTHING_LEFT)
        active = sorted({*active, *hardened})
        ctx.step = StepState(*target.aims, audit.prefix_tokens)

        # --- one gradient step -------------------------------------------------------------------------
        # Data parallel: each rank takes a shard of the active sequences (the same retain batch on every rank);
        # a rank with nothing to do still joins the gradient all-reduce with weight 0.
        shard = active[accelerator.process_index :: accelerator.num_processes]
        forget_batch = Batch.of(sets.forget, shard or active[:1], ctx.pad_id, ctx.runtime.device)
        retain_batch = sample(sets.retain, settings.retain_batch, step_seed(settings, step), ctx)
        hessian_passes = 0  # Sophia: its h from this batch, at the weights this step starts from, every k steps
        if settings.optimizer == "sophia" and step % settings.sophia_every == 0:
            hessian_passes = refresh_hessian(optimizer, settings.sophia_hessian, ctx, objective, forget_batch,
                                             retain_batch, bool(shard), 2 * step_seed(settings, step) + 2, accelerator)
        forget_loss = objective.loss(ctx, forget_batch, retain_batch)
        forget_share, forget_value, forget_tokens = shard_totals(accelerator, objective, forget_batch, forget_loss,
                                                                 bool(shard))
        forget_loss = forget_loss * forget_share
        optimizer.zero_grad(set_to_none=True)
        loss = forget_loss
        if settings.sam_rho:  # .grad gets the forget gradient at w + eps; the regularizers below add theirs at w
            sam_gradient(accelerator, params, grad_mask, settings.sam_rho, forget_loss,  # (the lambda runs at once)
                         lambda: objective.loss(ctx, forget_batch, retain_batch) * forget_share)  # noqa: B023
            loss = torch.zeros((), device=forget_loss.device)
        loss_value = forget_value
        retain_value = None
        if settings.retain_kind != "none" and retain_batch is not None:
            retain_value = retain_loss(settings.retain_kind, ctx, retain_batch)
            loss = loss + settings.retain_weight * retain_value
            loss_value += settings.retain_weight * float(retain_value.detach())
        # as many neighbours as retain sequences, from a generator apart from the retain batch's
        neighbour_batch = sample(sets.neighbours, settings.retain_batch, 2 * step_seed(settings, step) + 1, ctx)
        neighbour_value = None
        if neighbour_batch is not None:
            neighbour_value = retain_loss("kl", ctx, neighbour_batch)
            loss = loss + settings.neighbour_weight * neighbour_value
            loss_value += settings.neighbour_weight * float(neighbour_value.detach())
        if not math.isfinite(loss_value):  # the same value on every rank: all stop together
            restore(params, best["weights"])
            return finish(f"loss diverged ({loss_value}) at step {step}; restored step {best['step']}", best["step"])
        if loss.requires_grad:  # not under SAM without regularizers: the forget gradient is all there is
            accelerator.backward(loss)
        hard_value, hard_tokens = harden_gradient(ctx, objective, target, accelerator, sets, retain_batch)
        loss_value += hard_value
        mask_gradients(grad_mask)
        optimizer.step()
        ctx.changed = True
        forget_passes = 2 if settings.sam_rho else 1  # SAM backpropagates the forget batch twice
        regularized = sum(int(b.mask.sum()) for b in (retain_batch, neighbour_batch) if b)
        tokens_trained += (forget_passes + hessian_passes) * forget_tokens + regularized + hard_tokens
        if accelerator.is_main_process:
            log_step(trajectory, step, loss_value, ma, sets.forget_names, target.band, active,
                     forget_loss=forget_value, holdout_mean=target.holdout_mean,
                     retain_loss=None if retain_value is None else float(retain_value.detach()),
                     **({} if neighbour_value is None else {"neighbour_kl": float(neighbour_value.detach())}),
                     **sophia_log(optimizer),
                     **({"hardened": [sets.forget_names[i] for i in hardened], "harden_loss": hard_value}
                        if hardened else {}),
                     loss_band=_edges(target.loss_band))
        step += 1

        if step % settings.guard_every == 0:
            now = utility(model, sets.retain, sets.general, ctx.runtime, audit.batch_size, ctx.pad_id)
            drop = utility_drop(utility_before, now)
            if drop > settings.max_utility_drop:
                restore(params, best["weights"])
                return finish(f"utility guard: utility fell {drop:.1%} (limit {settings.max_utility_drop:.0%}) "
                              f"at step {step}; restored step {best['step']}", best["step"])
            extractable = len(check.blocking)
            if best["extractable"] is None or extractable <= best["extractable"]:
                best = {"step": step, "extractable": extractable, "weights": snapshot(params)}
        if step % settings.checkpoint_every == 0 and (sharded or accelerator.is_main_process):  # FSDP: all write
            (sharded.save_checkpoint if sharded else save_checkpoint)(
                work, model, optimizer, {"step": step, "band": target.band.__dict__,
                                         "loss_band": target.loss_band.__dict__, "holdout_mean": target.holdout_mean,
                                         "best": best, "tokens_trained": tokens_trained})


def make_optimizer(params: list[torch.nn.Parameter], settings: LoopSettings) -> torch.optim.Optimizer:
    """Adam with betas (0.9, 0.98) as Jang et al. 2022; or Sophia (`--optimizer sophia`, `unlearning.sophia`)."""
    if settings.optimizer == "sophia":
        return Sophia(params, lr=settings.learning_rate, gamma=settings.sophia_gamma)
    return torch.optim.Adam(params, lr=settings.learning_rate, betas=(0.9, 0.98))


def sam_gradient(accelerator, params: list[torch.nn.Parameter], grad_mask: GradMask, rho: float,
                 loss: torch.Tensor, loss_again: Callable[[], torch.Tensor]) -> None:
    """Sharpness-aware minimization of the forget loss l_F (Foret et al. 2021; for unlearning Fan et al. 2025):
    leave in .grad its gradient at the worst weights within an L2 ball of radius rho, to first order:

        g    = M * grad l_F(w)          `loss` (l_F at w) backpropagated; M: the --mask-fraction mask (or 1)
        eps  = rho * g / ||g||_2        the norm over every trained parameter; no perturbation when g = 0
        .grad = grad l_F(w + eps)       `loss_again()`: l_F recomputed with the weights moved by eps

    and the weights back at w (copied back, not subtracted: bit for bit). The loop then adds the regularizers'
    gradient at w and masks, so the step is

        w <- Adam(M * (grad l_F(w + eps) + grad R(w)))      R = retain_weight * retain + neighbour_weight * KL

    That is min_w max_{||eps|| <= rho} l_F(w + eps) + R(w): as in Fan et al.'s released code
    (OPTML-Group/Unlearn-Smooth, SAMTrainer) only the forget loss is perturbed, and, as in SAM, eps is held fixed
    in the gradient. `params` are the trained parameters (the LoRA adapters under --lora), so only they move.
    Under DDP both backward passes go through the wrapped model: g is the all-reduced gradient, the same on every
    process, and so is eps. Cost: one more forward and backward of the forget batch.
    """
    accelerator.backward(loss)
    mask_gradients(grad_mask)
    moved = [p for p in params if p.grad is not None]
    norm = grad_norm(moved)  # under FSDP over every process's shards
    if not norm > 0:  # no direction to move in (or a non-finite gradient: the loop's loss check stops the run)
        return
    weights = snapshot(moved)
    with torch.no_grad():
        for param in moved:
            param.add_(param.grad, alpha=rho / norm)
            param.grad = None
    accelerator.backward(loss_again())
    restore(moved, weights)


def harden_gradient(ctx: Context, objective, target: Target, accelerator, sets: TokenSets,
                    retain_batch: Batch | None) -> tuple[float, int]:
    """--harden: add to .grad the forget loss's gradient at the quantized weights Q(w) of the last calibration, for
    the forget sequences that come back there (`target.hardened`), with the quantized model's aims:

        .grad += d l_F(Q(w); hardened, aims of Q(w)) / d Q(w)        applied to w (straight through)

    Returns (that loss over every rank's shard, its tokens); (0, 0) when none comes back. Data parallel as the
    forget batch: each rank a shard, scaled by `shard_totals`."""
    hardened = target.hardened
    if not hardened:
        return 0.0, 0
    shard = hardened[accelerator.process_index :: accelerator.num_processes]
    batch = Batch.of(sets.forget, shard or hardened[:1], ctx.pad_id, ctx.runtime.device)
    aims, ctx.step = ctx.step, StepState(*target.hard_aims, ctx.step.prefix_tokens)
    with weights_swapped(target.quantized):
        loss = objective.loss(ctx, batch, retain_batch)
        share, value, tokens = shard_totals(accelerator, objective, batch, loss, bool(shard))
        accelerator.backward(loss * share)
    ctx.step = aims
    return value, tokens


def mask_gradients(grad_mask: GradMask) -> None:
    """Zero the gradient of the weights --mask-fraction does not train."""
    for param, mask in (grad_mask or {}).items():
        if param.grad is not None:
            param.grad.mul_(mask)


def loss_units(objective, batch: Batch) -> float:
    """What the forget loss averages over in `batch`, as the method declares it (`averages_over`)."""
    return batch.units(objective.averages_over)


def shard_totals(accelerator, objective, batch: Batch, loss: torch.Tensor, has_shard: bool) -> tuple[float, float, int]:
    """(this rank's loss multiplier, the forget loss over every rank's shard, forget tokens over every rank).

    DDP averages gradients over the W ranks, so a rank holding u of the U units the loss averages over
    scales its mean by W * u / U: the averaged gradient is then that of the mean over all U units, as in one
    process. With one process the multiplier is exactly 1.
    """
    units = loss_units(objective, batch) if has_shard else 0.0
    weighted = units * float(loss.detach()) if has_shard else 0.0
    tokens = float(batch.mask.sum()) if has_shard else 0.0
    local = torch.tensor([units, weighted, tokens], dtype=torch.float64, device=accelerator.device)
    total = accelerator.reduce(local, "sum") if accelerator.num_processes > 1 else local
    all_units, weighted, tokens = (float(v) for v in total.cpu())
    return accelerator.num_processes * units / all_units, weighted / all_units, int(tokens)


def sample(token_lists: list[list[int]] | None, count: int, seed: int, ctx: Context) -> Batch | None:
    """`count` sequences drawn from a generator seeded by `seed` (the same batch on a resumed run); None when
    there are none."""
    if not token_lists:
        return None
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(len(token_lists), generator=generator)[:min(count, len(token_lists))].tolist()
    return Batch.of(token_lists, indices, ctx.pad_id, ctx.runtime.device)


def step_seed(settings: LoopSettings, step: int) -> int:
    return settings.seed * 1_000_003 + step


def snapshot(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def restore(params: list[torch.nn.Parameter], weights: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for param, value in zip(params, weights, strict=True):
            param.copy_(value)


def log_step(path: Path, step: int, loss: float | None, ma: list[float], names: list[str], band: Band,
             active: list[int], **extra) -> None:
    """One trajectory line: after `step` updates, the MA of every forget sequence, the band (and in `extra` the
    loss band), which sequences got gradient and the loss of the update taken from there (null on the last
    line: the run stopped)."""
    line = {"step": step, "loss": loss, **extra, "ma": {names[i]: round(v, 6) for i, v in enumerate(ma)},
            "active": [names[i] for i in active], "band": [band.lower, band.upper]}
    with path.open("a") as out:
        out.write(json.dumps(line) + "\n")


def _edges(band: LossBand | None) -> list[float | None] | None:
    return None if band is None else [band.lower, band.upper]


def keep_trajectory(path: Path, step: int) -> None:
    """On resume, drop the lines a killed run wrote after its last checkpoint."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] < step]
    path.write_text("".join(f"{line}\n" for line in lines))
