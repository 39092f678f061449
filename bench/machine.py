"""Shared by the benchmarks: the machine they ran on, and the floor they compare with."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from unmemorize.io.tokens import length_batches, pad


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@torch.no_grad()
def bare_forward(model, token_lists: list[list[int]], runtime, batch_size: int, pad_id: int) -> None:
    """The floor: the batches `score_tokens` makes, one forward pass each, logits left untouched."""
    for indices in length_batches(token_lists, batch_size):
        input_ids, mask = pad([token_lists[i] for i in indices], pad_id, device=runtime.device)
        with runtime.autocast():
            model(input_ids=input_ids, attention_mask=mask)
