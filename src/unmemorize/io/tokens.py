"""Tokenization and batching: the one place where text becomes padded tensors."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from ..errors import InputError
from .hashing import ids_sha256
from .sets import Sequence as TextSequence


def encode(tokenizer, sequences: Sequence[TextSequence], max_tokens: int, set_name: str = "set") -> list[list[int]]:
    """Token ids with the tokenizer's default special tokens, truncated to `max_tokens`.

    Every per-sequence measure needs at least two tokens (one to condition on, one to predict).
    """
    if max_tokens < 2:
        raise InputError(f"--max-tokens must be at least 2, got {max_tokens}")
    encoded = tokenizer([s.text for s in sequences], truncation=True, max_length=max_tokens)["input_ids"]
    for seq, ids in zip(sequences, encoded, strict=True):
        if len(ids) < 2:
            raise InputError(f"{set_name}: sequence {seq.id!r} has {len(ids)} token(s); at least 2 are needed")
    return [list(ids) for ids in encoded]


def pad(token_lists: Sequence[Sequence[int]], pad_id: int, left: bool = False,
        device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to one tensor (on `device` when given). Right padding for teacher forcing; left for generation."""
    width = max(len(ids) for ids in token_lists)
    input_ids = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_lists), width), dtype=torch.long)
    for row, ids in enumerate(token_lists):
        span = slice(width - len(ids), width) if left else slice(0, len(ids))
        input_ids[row, span] = torch.tensor(ids, dtype=torch.long)
        mask[row, span] = 1
    if device is not None:
        return to_device(input_ids, device), to_device(mask, device)
    return input_ids, mask


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """On CUDA, copy from pinned memory without blocking, so the copy overlaps the GPU's work on the previous
    batch; elsewhere a plain move."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def length_batches(token_lists: Sequence[Sequence[int]], batch_size: int) -> Iterator[list[int]]:
    """Indices grouped by similar length (longest first), so padding stays small."""
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    order = sorted(range(len(token_lists)), key=lambda i: -len(token_lists[i]))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def pad_id_of(tokenizer) -> int:
    """Padding never reaches a loss or a score (masks see to that), so any valid id will do."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0

__all__ = ["encode", "ids_sha256", "length_batches", "pad", "pad_id_of", "to_device"]
