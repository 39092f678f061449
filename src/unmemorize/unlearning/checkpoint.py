"""Resumable checkpoints: weights, optimizer, loop state; written atomically into the run's work folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

NAME = "checkpoint"


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
    final = work / NAME
    old = work / f".{NAME}.old"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(work: Path, model, optimizer) -> dict:
    """Restore weights and optimizer in place; return the loop state ({} when there is no checkpoint)."""
    folder = work / NAME
    if not (folder / "state.json").exists():
        return {}
    unwrapped = getattr(model, "module", model)
    load_model(unwrapped, str(folder / "model.safetensors"))
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    state = json.loads((folder / "state.json").read_text())
    best = load_file(folder / "best.safetensors")
    state["best"]["weights"] = [best[str(i)] for i in range(len(best))]
    return state
