"""Efficiency of a run: tokens through the model, peak memory. (Wall seconds per phase are timed in run.py.)"""

from __future__ import annotations

import resource

import torch


class TokenCounter:
    """Counts the real (unpadded) tokens of every forward pass of `model`: scoring, training, decoding.

    A forward pre-hook sees each call's input_ids; under a KV cache a decoding step brings one new token per
    row, and the attention mask's last columns say which of the new positions are padding.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.tokens = 0
        self._handle = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            return
        mask = kwargs.get("attention_mask")
        width = input_ids.shape[-1]
        self.tokens += int(mask[:, -width:].sum()) if mask is not None else input_ids.numel()

    def close(self) -> int:
        self._handle.remove()
        return self.tokens


def peak_memory_mb() -> float:
    """Peak resident memory of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_gpu_memory_mb() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
