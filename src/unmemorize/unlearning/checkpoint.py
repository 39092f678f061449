"""Resumable checkpoints: weights, optimizer, loop state; written atomically into the run's work folder.

One process (data parallel or none): safetensors of the weights and of the best state, the optimizer's state
dict, `state.json`, written by the main process. Sharded (FSDP, `unlearning/fsdp.py`): the same in
torch.distributed.checkpoint's format, each process writing its own shards (`save_sharded`, `load_sharded`);
it reshards on load, so a run may resume with another number of processes. A checkpoint is resumed in the
mode it was written in.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from ..errors import InputError

NAME = "checkpoint"
SHARDED_MARK = ".metadata"  # torch.distributed.checkpoint's index file: a sharded checkpoint


def save_checkpoint(work: Path, model, optimizer, state: dict) -> None:
    tmp = work / f".{NAME}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    unwrapped = getattr(model, "module", model)
    save_model(unwrapped, str(tmp / "model.safetensors"))  # handles tied weights
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    best = state.pop("best")
    save_file({str(i): w.contiguous() for i, w in enumerate(best["weights"])}, tmp / "best.safetensors")
    state["best"] = {k: v for k, v in best.items() if k != "weights"}
    (tmp / "state.json").write_text(json.dumps(state))
    state["best"] = best
    _replace(work, tmp)


def load_checkpoint(work: Path, model, optimizer) -> dict:
    """Restore weights and optimizer in place; return the loop state ({} when there is no checkpoint)."""
    folder = work / NAME
    if not (folder / "state.json").exists():
        return {}
    if (folder / SHARDED_MARK).exists():
        raise InputError(f"--resume: the checkpoint in {folder} is sharded (written under FSDP); resume it under "
                         "FSDP (ACCELERATE_USE_FSDP=true, several processes)")
    unwrapped = getattr(model, "module", model)
    load_model(unwrapped, str(folder / "model.safetensors"))
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    state = json.loads((folder / "state.json").read_text())
    best = load_file(folder / "best.safetensors")
    state["best"]["weights"] = [best[str(i)] for i in range(len(best))]
    return state


def _replace(work: Path, tmp: Path) -> None:
    """Make `tmp` the checkpoint (the previous one is removed only once the new one is in place)."""
    final, old = work / NAME, work / f".{NAME}.old"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _sharded_state(model, optimizer, best: list[torch.Tensor]) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer),
            "best": {str(i): w for i, w in enumerate(best)}}


def save_sharded(work: Path, model, optimizer, state: dict, main: bool) -> None:
    """Every process: write its shards of the weights, the Adam state and the best state (a collective); the
    main process writes `state.json` and puts the folder in place."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    tmp = work / f".{NAME}.tmp"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    dcp.save(_sharded_state(model, optimizer, state["best"]["weights"]), checkpoint_id=str(tmp))
    if main:
        loop_state = {**state, "best": {k: v for k, v in state["best"].items() if k != "weights"}}
        (tmp / "state.json").write_text(json.dumps(loop_state))
        _replace(work, tmp)
    dist.barrier()


def load_sharded(work: Path, model, optimizer, params: list[torch.nn.Parameter]) -> dict:
    """Every process: restore its shards of the weights and the Adam state in place; return the loop state with
    the best state's shards ({} when there is no checkpoint). `params`: the trained (sharded) parameters, whose
    shapes the best state has."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    folder = work / NAME
    if not (folder / "state.json").exists():
        return {}
    if not (folder / SHARDED_MARK).exists():
        raise InputError(f"--resume: the checkpoint in {folder} was written without FSDP; resume it without "
                         "ACCELERATE_USE_FSDP")
    loaded = _sharded_state(model, optimizer, [p.detach().clone() for p in params])
    dcp.load(loaded, checkpoint_id=str(folder))
    set_model_state_dict(model, loaded["model"])
    set_optimizer_state_dict(model, optimizer, loaded["optimizer"])
    state = json.loads((folder / "state.json").read_text())
    state["best"]["weights"] = [loaded["best"][str(i)] for i in range(len(params))]
    return state
