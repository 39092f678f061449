"""Notes: one line on stderr about a choice made for the user (a truncation, a cached copy), once per process.

Under torchrun only the main process says it, as it is the one that reports.
"""

from __future__ import annotations

import os
import sys

_said: set[str] = set()


def note(message: str) -> None:
    """Print `unmemorize: note: <message>` on stderr, the first time this process is told this message."""
    if message in _said:
        return
    _said.add(message)
    if os.environ.get("RANK", "0") != "0":
        return
    print(f"unmemorize: note: {message}", file=sys.stderr, flush=True)
