"""Sophia (Liu et al. 2023, "Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
Pre-training"), the optimizer of second-order unlearning (SOUL, Jia et al. 2024): `--optimizer sophia`.

The update (the paper's Algorithm 3; every operation elementwise, over each trained weight tensor), at the
loop's steps t = 1, 2, ...:

    g_t = the gradient the loop leaves in .grad: forget loss + regularizers, masked by --mask-fraction
    m_t = beta1 * m_{t-1} + (1 - beta1) * g_t                                              m_0 = 0
    h_t = beta2 * h_{t-1} + (1 - beta2) * hhat_t     at t = 1, 1 + k, 1 + 2k, ... (`--sophia-every` k)   h_0 = 0
    h_t = h_{t-1}                                     at the other steps
    w  <- w - lr * weight_decay * w                   decoupled weight decay (0 in the loop: see below)
    w  <- w - lr * clip(m_t / max(gamma * h_t, eps), 1)          clip(z, 1) = max(-1, min(z, 1))

with no bias correction of m or h, as in the paper. Where the estimated curvature is large the step is the
Newton step m / (gamma * h) of a diagonal quadratic model; where it is small, negative or not yet estimated the
ratio passes 1 and the step is lr * sign(m). No weight moves more than lr in one step.

hhat, the diagonal Hessian estimate (`--sophia-hessian`), comes from this step's forget batch at the weights
the step starts from:

  gnb (Gauss-Newton-Bartlett, Sophia-G; the default):
      yhat_b ~ p_w( . | x_<b)                      one token sampled from the model at each predicted position b
      L^ = (1/B) sum_b -log p_w(yhat_b | x_<b)     B: the real (not padding) predicted positions of the batch
      hhat = B * grad(L^) * grad(L^)
    Its expectation is the diagonal of the Gauss-Newton matrix (1/B) sum_b J_b^T (diag(p_b) - p_b p_b^T) J_b
    (J_b: the Jacobian of the logits at b) of the forget tokens' mean NLL, i.e. their Fisher information: never
    negative, and the curvature influence unlearning divides by (the Hessian of the training loss at the data
    to forget), which is the link SOUL draws between Sophia and influence functions.
  hutchinson (Sophia-H):
      u ~ Rademacher (each entry +1 or -1 with probability 1/2)
      hhat = u * (H u)                             H: the Hessian of the method's forget loss, as the loop
                                                   minimizes it (a Hessian-vector product: a double backward)
    Its expectation is diag(H), since E[u u^T] = I. For an ascent-type loss at a memorized sequence the NLL is
    at a minimum, so H is mostly negative: there max(gamma * h, eps) = eps and the step is the clipped sign step.

Which Hessian. SOUL steps its unlearning objectives (forget loss plus a retain regularizer) with Sophia. Its
released code (OPTML-Group/SOUL, `src/optim/sophia.py`) refreshes h at every step from the square of that
objective's own minibatch gradient, the GNB form with the data's labels instead of sampled ones, times a fixed
batch size of 5120. Here hhat is
estimated on the forget batch only (the retain and neighbour regularizers are kept near where they are and
need no Newton step): GNB by default, with labels sampled as the Sophia paper prescribes (the squared gradient
of the objective itself is no unbiased curvature estimate), or the literal Hessian of the method's forget loss
with Hutchinson. Defaults are SOUL's released settings for unlearning: betas (0.9, 0.95), gamma 0.04, and a
refresh at every step (k = 1), as SOUL's code does; runs here take tens of steps, not the 100,000 of the
pre-training Sophia was tuned on (k = 10 there). The loop's Adam has no weight decay and neither has its
Sophia: decaying a trained model's weights towards zero is no part of unlearning a request.

Data parallel: the estimate is computed on the plain module with `torch.autograd.grad` (DDP does not support
it, nor double backward) and the per-process pieces are summed across processes, so every process folds the
same hhat into h (FSDP refuses Sophia: `unlearning.fsdp`). The random draws (GNB's labels, per forget sequence;
Hutchinson's u) derive from the step's seed, so a resumed run and a run over several processes draw what a
single uninterrupted run draws.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..measure.scoring import forward_logits
from .context import Batch, Context

GNB, HUTCHINSON = "gnb", "hutchinson"
BETAS = (0.9, 0.95)  # SOUL's released configurations (configs/TOFU/SO_*.json); the Sophia paper's are (0.965, 0.99)
EPS = 1e-12


class Sophia(torch.optim.Optimizer):
    """Sophia's update (the module docstring): `step` uses the h of the last `update_hessian`.

    State per weight tensor: `step` (updates taken), `exp_avg` (m) and `hessian` (h), all in `state_dict`, so a
    checkpoint resumes the EMA exactly. After each `step`, `clipped` is the fraction of the weights it updated
    whose ratio |m / max(gamma * h, eps)| was 1 or more: those took the sign step lr * sign(m), not a Newton
    step."""

    def __init__(self, params: Iterable, lr: float, betas: tuple[float, float] = BETAS, gamma: float = 0.04,
                 eps: float = EPS, weight_decay: float = 0.0) -> None:
        if not lr > 0 or not gamma > 0 or not eps > 0 or weight_decay < 0:
            raise ValueError(f"Sophia: lr {lr}, gamma {gamma} and eps {eps} must be > 0, weight_decay >= 0")
        if not all(0 <= beta < 1 for beta in betas):
            raise ValueError(f"Sophia: betas {betas} must be in [0, 1)")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "gamma": gamma, "eps": eps,
                                  "weight_decay": weight_decay})
        self.clipped: float | None = None

    def _state(self, param: torch.Tensor) -> dict:
        state = self.state[param]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["hessian"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state

    def param_list(self) -> list[torch.Tensor]:
        return [param for group in self.param_groups for param in group["params"]]

    @torch.no_grad()
    def update_hessian(self, estimates: list[torch.Tensor]) -> None:
        """h <- beta2 * h + (1 - beta2) * hhat; `estimates`: hhat of each of `param_list()`, in that order."""
        params = self.param_list()
        if len(estimates) != len(params):
            raise ValueError(f"Sophia: {len(estimates)} Hessian estimates for {len(params)} parameters")
        estimate = iter(estimates)
        for group in self.param_groups:
            beta2 = group["betas"][1]
            for param in group["params"]:
                self._state(param)["hessian"].mul_(beta2).add_(next(estimate).to(param.dtype), alpha=1 - beta2)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        clipped, total = torch.zeros((), dtype=torch.float64), 0
        for group in self.param_groups:
            beta1 = group["betas"][0]
            lr, gamma, eps, decay = group["lr"], group["gamma"], group["eps"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self._state(param)
                state["step"] += 1
                m = state["exp_avg"].mul_(beta1).add_(param.grad, alpha=1 - beta1)
                ratio = m / (gamma * state["hessian"]).clamp(min=eps)
                if decay:
                    param.mul_(1 - lr * decay)
                param.add_(ratio.clamp(-1, 1), alpha=-lr)
                clipped += (ratio.abs() >= 1).sum().cpu()
                total += ratio.numel()
        self.clipped = float(clipped) / total if total else None
        return loss


def unwrapped(optimizer) -> torch.optim.Optimizer:
    """The optimizer itself, also when accelerate's `prepare` has wrapped it."""
    return getattr(optimizer, "optimizer", optimizer)


def sophia_log(optimizer) -> dict:
    """What a trajectory line records of the optimizer: the fraction of weights Sophia's last step clipped."""
    inner = unwrapped(optimizer)
    if not isinstance(inner, Sophia) or inner.clipped is None:
        return {}
    return {"sophia_clipped": round(inner.clipped, 6)}


def refresh_hessian(optimizer, estimator: str, ctx: Context, objective, forget: Batch, retain: Batch | None,
                    has_shard: bool, seed: int, accelerator) -> int:
    """Fold hhat of this step's forget batch into Sophia's h (the module docstring). `has_shard`: whether this
    process holds forget sequences (one without still joins the sums with weight 0). Returns the backward passes
    it took (for the loop's count of trained tokens)."""
    sophia = unwrapped(optimizer)
    params = sophia.param_list()
    model = ctx.model
    ctx.model = getattr(model, "module", model)  # the plain module under DDP; the sums across processes are ours
    try:
        if estimator == GNB:
            estimates, passes = gnb_estimate(ctx, forget, params, has_shard, seed, accelerator), 1
        elif estimator == HUTCHINSON:
            estimates = hutchinson_estimate(ctx, objective, forget, retain, params, has_shard, seed, accelerator)
            passes = 2
        else:
            raise ValueError(f"unknown Hessian estimator {estimator!r}")
    finally:
        ctx.model = model
    sophia.update_hessian(estimates)
    return passes


def gnb_estimate(ctx: Context, forget: Batch, params: list[torch.Tensor], has_shard: bool, seed: int,
                 accelerator) -> list[torch.Tensor]:
    """hhat = B * grad(L^)^2, L^ the mean NLL of tokens sampled from the model at the forget batch's positions."""
    logits = forward_logits(ctx.model, forget.input_ids, forget.mask, ctx.runtime)[:, :-1]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    sampled = sample_tokens(logprobs.detach(), forget, seed)
    mask = forget.target_mask if has_shard else torch.zeros_like(forget.target_mask)
    nll = -(logprobs.gather(-1, sampled[..., None]).squeeze(-1) * mask).sum()
    count = max(summed(accelerator, [mask.sum().detach().double()])[0].item(), 1.0)  # B over every process
    grads = torch.autograd.grad(nll / count, params, allow_unused=True, materialize_grads=True)
    grads = summed(accelerator, list(grads))  # the gradient of L^ over the whole batch
    return [g.mul_(g).mul_(count) for g in grads]


def hutchinson_estimate(ctx: Context, objective, forget: Batch, retain: Batch | None, params: list[torch.Tensor],
                        has_shard: bool, seed: int, accelerator) -> list[torch.Tensor]:
    """hhat = u * (H u), H the Hessian of the method's forget loss over the whole batch, u Rademacher."""
    units = forget.units(objective.averages_over) if has_shard else 0.0  # this process's weight in the mean
    all_units = summed(accelerator, [torch.tensor(units, dtype=torch.float64)])[0].item()
    generator = torch.Generator().manual_seed(seed)
    u = [torch.randint(0, 2, p.shape, generator=generator, dtype=torch.int8).to(p.device, p.dtype) * 2 - 1
         for p in params]
    with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no double backward
        loss = objective.loss(ctx, forget, retain) * (units / all_units)
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True, materialize_grads=True)
        moving = [i for i, g in enumerate(grads) if g.requires_grad]
        products = torch.autograd.grad([grads[i] for i in moving], [params[i] for i in moving],
                                       grad_outputs=[u[i] for i in moving], allow_unused=True,
                                       materialize_grads=True)
    hvp = [torch.zeros_like(p) for p in params]
    for i, product in zip(moving, products, strict=True):
        hvp[i] = product.detach()
    hvp = summed(accelerator, hvp)  # H u of the whole batch's loss
    return [v * h for v, h in zip(u, hvp, strict=True)]


def sample_tokens(logprobs: torch.Tensor, forget: Batch, seed: int) -> torch.Tensor:
    """One token per predicted position from p = exp(logprobs) (batch, width, vocab), by the inverse CDF,

        yhat = the first token j with cdf_j >= U * cdf_V        cdf_j = p_1 + ... + p_j,  U ~ Uniform(0, 1)

    U drawn for each forget sequence from a generator seeded by (seed, its index in the forget set), as many as
    it has predicted tokens (0 on padding): a sequence gets the same draws whichever process and batch hold it."""
    uniforms = torch.zeros(logprobs.shape[:2], dtype=torch.float64)
    for row, (index, count) in enumerate(zip(forget.indices, forget.target_mask.sum(-1).tolist(), strict=True)):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        uniforms[row, : int(count)] = torch.rand(int(count), generator=generator, dtype=torch.float64)
    cdf = logprobs.exp().cumsum(-1)
    point = (uniforms.to(cdf.device, cdf.dtype) * cdf[..., -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, point).squeeze(-1).clamp_(max=logprobs.shape[-1] - 1)


def summed(accelerator, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor summed over the processes (as it is with one process)."""
    if accelerator.num_processes == 1:
        return tensors
    return accelerator.reduce([t.to(accelerator.device) for t in tensors], "sum")
