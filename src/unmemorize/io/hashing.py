"""Hashes that name data without keeping it (numpy and hashlib only: the report layer uses them)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


def ids_sha256(ids: Sequence[int]) -> str:
    """SHA-256 of the token ids as little-endian int32 bytes: names a sequence without keeping its text
    (ledger and certificate alike)."""
    return hashlib.sha256(np.asarray(ids, dtype="<i4").tobytes()).hexdigest()
