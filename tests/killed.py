"""A run killed right after its first checkpoint and resumed must end where the uninterrupted run ends."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from unmemorize.io.models import folder_sha256
from unmemorize.runs.run import unlearn
from unmemorize.unlearning import loop


class Killed(Exception):
    pass


def assert_resumes_bit_for_bit(model: Path, sets: dict, general: list, settings, runtime, tmp_path: Path,
                               monkeypatch, between: Callable[[Path], None] | None = None) -> None:
    """Run `settings` whole; run it again, raising right after the first checkpoint is written (a crash), call
    `between` on the checkpoint folder left behind, resume; the model and trajectory equal the whole run's."""
    unlearn(str(model), sets, general, settings, runtime, tmp_path / "whole")
    save = loop.save_checkpoint

    def save_then_die(work, model, optimizer, state):
        save(work, model, optimizer, state)
        raise Killed

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        unlearn(str(model), sets, general, settings, runtime, tmp_path / "cut")
    monkeypatch.setattr(loop, "save_checkpoint", save)
    if between is not None:
        between(tmp_path / "cut.partial" / "checkpoint")
    unlearn(str(model), sets, general, settings, runtime, tmp_path / "cut", resume=True)
    assert folder_sha256(tmp_path / "cut" / "model") == folder_sha256(tmp_path / "whole" / "model")
    assert (tmp_path / "cut" / "trajectory.jsonl").read_text() == (tmp_path / "whole" / "trajectory.jsonl").read_text()
