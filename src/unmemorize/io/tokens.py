"""Tokenization and batching: the one place where text becomes padded tensors."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch

from ..errors import InputError
from .hashing import ids_sha256
from .notes import note
from .sets import Sequence as TextSequence
from .sets import source_of

# Where load_model records the model's context length (tokens) on its tokenizer: encode never makes a sequence
# longer than the model can take. Not the tokenizer's model_max_length: that one is saved with the tokenizer
# and makes it warn about every longer text it is asked to tokenize whole.
CONTEXT_ATTRIBUTE = "unmemorize_context_length"


def set_context_length(tokenizer, context: int | None) -> None:
    setattr(tokenizer, CONTEXT_ATTRIBUTE, context)


def context_length(tokenizer) -> int | None:
    """The context length of the model `tokenizer` was loaded with (load_model), None when unknown."""
    return getattr(tokenizer, CONTEXT_ATTRIBUTE, None)


def token_limit(tokenizer, max_tokens: int) -> int:
    """What sequences are truncated to: `max_tokens`, or the model's context when that is shorter."""
    context = context_length(tokenizer)
    return max_tokens if context is None else min(max_tokens, context)


def encode(tokenizer, sequences: Sequence[TextSequence], max_tokens: int, set_name: str = "set") -> list[list[int]]:
    """Token ids with the tokenizer's default special tokens, truncated to `max_tokens`, or to the model's context
    when that is shorter (a note says so once, when a sequence is cut by it).

    Every per-sequence measure needs at least two tokens (one to condition on, one to predict).
    """
    if max_tokens < 2:
        raise InputError(f"--max-tokens must be at least 2, got {max_tokens}")
    texts = [s.text for s in sequences]
    encoded = [list(ids) for ids in tokenizer(texts, truncation=True, max_length=max_tokens)["input_ids"]]
    limit = token_limit(tokenizer, max_tokens)
    longer = [i for i, ids in enumerate(encoded) if len(ids) > limit]
    if longer:
        # Encoded again, not cut: truncation keeps the special tokens a tokenizer puts at the end.
        again = tokenizer([texts[i] for i in longer], truncation=True, max_length=limit)["input_ids"]
        for i, ids in zip(longer, again, strict=True):
            encoded[i] = list(ids)
        note(f"--max-tokens {max_tokens} is longer than the model's context ({limit} tokens); sequences are "
             f"truncated to {limit}")
    for seq, ids in zip(sequences, encoded, strict=True):
        if len(ids) < 2:
            raise InputError(f"{set_name}: sequence {seq.id!r} has {len(ids)} token(s); at least 2 are needed")
    return encoded


# The sets that must not share a sequence with the forget set, and what would go wrong if they did.
MUST_NOT_SHARE = (
    ("holdout", "the band would be calibrated on the data being deleted"),
    ("retain", "the run would be told to keep what it deletes"),
    ("neighbours", "the run would be told to keep what it deletes"),
)
# The sets that must not share a sequence with the holdout: the band is calibrated on text never trained on.
MUST_NOT_SHARE_HOLDOUT = (
    ("neighbours", "the band would be calibrated on text the run trains on"),
)


def check_disjoint(token_ids: Mapping[str, Sequence[Sequence[int]] | None],
                   sets: Mapping[str, Sequence[TextSequence]]) -> None:
    """Refuse a holdout, a retain set or neighbours that share sequences with the forget set, and neighbours that
    share sequences with the holdout, compared by token ids (after truncation, as they are measured). One
    InputError names the files, how many sequences they share and one example. `token_ids[name][k]` are the ids
    of `sets[name][k]`; sets that are absent (or None) pass."""
    problems = [*_shared(token_ids, sets, "forget", MUST_NOT_SHARE),
                *_shared(token_ids, sets, "holdout", MUST_NOT_SHARE_HOLDOUT)]
    if problems:
        raise InputError("; ".join(problems))


def _shared(token_ids, sets, base: str, rules) -> list[str]:
    """What each set of `rules` shares with the set `base`, one sentence each."""
    base_ids = token_ids.get(base)
    if not base_ids:
        return []
    first_of = {}
    for index, ids in enumerate(base_ids):
        first_of.setdefault(tuple(ids), index)
    problems = []
    for name, consequence in rules:
        ids_of_set = token_ids.get(name)
        if not ids_of_set:
            continue
        shared = [(k, first_of[tuple(ids)]) for k, ids in enumerate(ids_of_set) if tuple(ids) in first_of]
        if shared:
            k, f = shared[0]
            problems.append(
                f"--{name} {source_of(sets[name], name)} shares {len(shared)} sequence(s) with --{base} "
                f"{source_of(sets[base], base)} (the same token ids after truncation; e.g. id "
                f"{sets[name][k].id!r} is {base} id {sets[base][f].id!r}): {consequence}; remove them")
    return problems


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

__all__ = ["check_disjoint", "context_length", "encode", "ids_sha256", "length_batches", "pad", "pad_id_of",
           "set_context_length", "to_device", "token_limit"]
