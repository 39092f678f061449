"""Fully sharded data parallel unlearning (PyTorch FSDP2, `torch.distributed.fsdp.fully_shard`).

On when the run has several processes and `ACCELERATE_USE_FSDP=true`: `accelerate launch` sets it from an FSDP
config (`docs/accelerate/fsdp.yaml`, `fsdp_version: 2`); with `torchrun` set it yourself (on CPU it is the only
way: accelerate's own FSDP support needs GPUs). The loop then shards the model itself (`fully_shard` on every
decoder layer, then on the whole model: parameters, gradients and Adam state are split in dim-0 chunks over the
W processes) instead of wrapping it in DDP, and gives it back as a plain module with the full weights when it
stops (`Sharded.gather`), so the audit after unlearning, the evaluation and the save see an ordinary model.

What the loop does to parameters, and how each stays right under sharding:
  - the trained parameters and the `--mask-fraction` masks were taken before sharding: `shard` replaces them, in
    the caller's list and dict, by the sharded parameters and by masks cut into the same chunks, so nothing keeps
    the unsharded tensors alive;
  - the best-state snapshot, the restore and the SAM perturbation act on each process's shards (elementwise);
    SAM's norm is over every shard: ||g|| = sqrt(sum over processes of ||g_r||^2) (`grad_norm`);
  - gradients: FSDP's reduce-scatter averages them over the processes, as DDP's all-reduce does, so the loop's
    loss scaling (`loop.shard_totals`) is the same;
  - the frozen original model (KL retain loss, neighbour KL, UNDIAL's teacher, RMU's activations) is sharded too
    (`frozen_copy`), made from the shards: no process ever holds a second full copy;
  - checkpoints are sharded (`checkpoint.save_sharded`, torch.distributed.checkpoint): each process writes its
    shards of the weights, the Adam state and the best state; `--resume` reads them back (with any number of
    processes).
Every process must run the same forward and backward passes (each one all-gathers a layer's weights): it does,
since every process scores every sequence and takes the same decisions.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError
from ..io.notes import note
from .context import Context


def fsdp_requested(accelerator, settings=None) -> bool:
    """Whether this run shards the model: several processes and ACCELERATE_USE_FSDP=true (FSDP2 only).
    InputError for the loop options not supported under sharding yet (`settings`: the loop's)."""
    if accelerator.num_processes < 2 or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return False
    if os.environ.get("FSDP_VERSION", "2") != "2":
        raise InputError("FSDP: only FSDP2 is supported; set fsdp_version: 2 in the accelerate config "
                         "(FSDP_VERSION=2)")
    for variable, what in (("FSDP_OFFLOAD_PARAMS", "fsdp_offload_params"),
                           ("FSDP_ACTIVATION_CHECKPOINTING", "fsdp_activation_checkpointing")):
        if os.environ.get(variable, "false").lower() == "true":
            raise InputError(f"FSDP: {what} ({variable}) is not supported yet; set it to false")
    if getattr(settings, "optimizer", "adam") != "adam":
        raise InputError(f"--optimizer {settings.optimizer}: not supported under FSDP yet (Adam only)")
    if getattr(settings, "harden", "none") != "none":
        raise InputError(f"--harden {settings.harden}: not supported under FSDP yet")
    return True


def wrapped_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules that get their own FSDP unit: the classes named in FSDP_TRANSFORMER_CLS_TO_WRAP (accelerate's
    `fsdp_transformer_layer_cls_to_wrap`), else the model's `_no_split_modules` (its decoder layer class)."""
    names = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP") or ",".join(getattr(model, "_no_split_modules", None) or [])
    wanted = {name.strip() for name in names.split(",") if name.strip()}
    layers = [module for module in model.modules() if type(module).__name__ in wanted and module is not model]
    if wanted and not layers:
        raise InputError(f"FSDP: the model has no module of class {', '.join(sorted(wanted))} to shard "
                         "(FSDP_TRANSFORMER_CLS_TO_WRAP, accelerate's fsdp_transformer_layer_cls_to_wrap: name the "
                         "model's decoder layer class, or leave it unset)")
    return layers


def meta_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of `model` whose parameters are empty tensors on the meta device (no memory); buffers and tied
    parameters are kept as they are."""
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def grad_norm(params: list[torch.Tensor]) -> float:
    """||g||_2 over the gradients of `params`; for sharded parameters sqrt(sum_r ||g_r||^2) over the processes."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if not any(isinstance(g, DTensor) for g in grads):
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))
    local = sum((g.to_local().float().pow(2).sum() for g in grads), torch.zeros((), device=grads[0].device))
    local = local.to(torch.float64)
    torch.distributed.all_reduce(local)
    return float(local.sqrt())


@dataclass
class Sharded:
    """A model sharded in place by `shard`, with what is needed to copy it (a frozen reference) and to give it
    back unsharded (`gather`)."""

    ctx: Context
    model: torch.nn.Module
    skeleton: torch.nn.Module
    """The model as it was before sharding, parameters on the meta device: what `gather` and `frozen_copy` fill."""
    mesh: object
    params: list[torch.nn.Parameter]

    @classmethod
    def shard(cls, ctx: Context, params: list[torch.nn.Parameter], grad_mask: dict | None) -> Sharded:
        """fully_shard every decoder layer of `ctx.model`, then the model; replace in place the entries of `params`
        and `grad_mask` (taken before sharding) by the sharded parameters and the masks cut like them. From now on
        `ctx.keep_original` makes a sharded frozen copy; one made before (by a method's `prepare` for the gradient
        mask) is sharded here."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import distribute_tensor

        model = ctx.model
        names = {id(p): name for name, p in model.named_parameters()}
        trained = [names[id(p)] for p in params]
        masks = {names[id(p)]: mask for p, mask in (grad_mask or {}).items()}
        skeleton = meta_copy(model)
        mesh = init_device_mesh(ctx.runtime.device.type, (torch.distributed.get_world_size(),))
        units = _fully_shard(model, mesh)
        note(f"FSDP: the model is sharded over {mesh.size()} processes ({units} FSDP units)")
        now = dict(model.named_parameters())
        params[:] = [now[name] for name in trained]
        if grad_mask is not None:
            grad_mask.clear()
            # the same dim-0 chunks as the parameter's: every process holds the whole mask, so no communication
            grad_mask.update({now[name]: distribute_tensor(mask, mesh, now[name].placements, src_data_rank=None)
                              for name, mask in masks.items()})
        sharded = cls(ctx, model, skeleton, mesh, list(params))
        ctx.copy_original = sharded.frozen_copy
        if ctx._original is not None and not isinstance(ctx._original, FSDPModule):
            _fully_shard(ctx._original, mesh)
        return sharded

    def frozen_copy(self, model: torch.nn.Module | None = None) -> torch.nn.Module:
        """A sharded copy of the model's current weights, frozen: the copy of the skeleton sharded like the model,
        each process's shards copied from its own (no communication, never a full copy)."""
        model = model or self.model
        _reshard(model)
        copied = copy.deepcopy(self.skeleton).requires_grad_(False)
        _fully_shard(copied, self.mesh)
        device = next(p for p in model.parameters()).device
        copied.to_empty(device=device)
        with torch.no_grad():
            pairs = zip(copied.named_parameters(), model.named_parameters(), strict=True)
            for (name, mine), (theirs_name, theirs) in pairs:
                assert name == theirs_name, (name, theirs_name)
                mine.to_local().copy_(theirs.to_local())
            for (_, mine), (_, theirs) in zip(copied.named_buffers(), model.named_buffers(), strict=True):
                mine.copy_(theirs)  # to_empty emptied them
        return copied.eval()

    def gather(self) -> torch.nn.Module:
        """The model with its full weights on every process, as a plain module (a collective: every process calls
        it). The skeleton receives them: tied parameters stay tied."""
        from torch.distributed.tensor import DTensor

        _reshard(self.model)
        full: dict[int, torch.nn.Parameter] = {}
        pairs = zip(self.skeleton.named_parameters(), self.model.named_parameters(), strict=True)
        for (name, empty), (sharded_name, sharded) in pairs:
            assert name == sharded_name, (name, sharded_name)
            value = sharded.full_tensor() if isinstance(sharded, DTensor) else sharded
            full[id(empty)] = torch.nn.Parameter(value.detach().clone(), requires_grad=empty.requires_grad)
        for module in self.skeleton.modules():
            for key, param in module._parameters.items():
                if param is not None:
                    module._parameters[key] = full[id(param)]
        self.ctx.copy_original = None  # a copy of the original is made from the sharded model only
        return self.skeleton

    def save_checkpoint(self, work: Path, model, optimizer, state: dict) -> None:
        from .checkpoint import save_sharded

        save_sharded(work, model, optimizer, state, torch.distributed.get_rank() == 0)

    def load_checkpoint(self, work: Path, model, optimizer) -> dict:
        from .checkpoint import load_sharded

        return load_sharded(work, model, optimizer, self.params)


def _fully_shard(model: torch.nn.Module, mesh) -> int:
    """Shard every decoder layer, then the rest of the model; the number of FSDP units."""
    from torch.distributed.fsdp import fully_shard

    layers = wrapped_layers(model)
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    # The root too (FSDP's default keeps it gathered after forward): the embeddings and the head are large, and
    # then the registered parameters are the shards whenever the loop reads or writes them.
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    return len(layers) + 1


def _reshard(model: torch.nn.Module) -> None:
    """Register the shards again on every FSDP unit still holding gathered weights."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
