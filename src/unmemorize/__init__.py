"""unmemorize: find which training sequences a language model memorized, make it forget them one by one,
and prove it.

The public API is loaded on first use (PEP 562), so `import unmemorize` and `unmemorize --version` stay cheap
and a layer low in the data flow (report/, io/) can be imported without the layers above it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._version import __version__

_API = {
    "AuditResult": "measure.audit", "AuditSettings": "measure.audit", "SequenceResult": "measure.audit",
    "audit": "measure.audit", "Band": "measure.band", "calibrate": "measure.band", "LossBand": "measure.band",
    "calibrate_loss": "measure.band", "Sequence": "io.sets",
    "load_set": "io.sets", "InputError": "errors", "Runtime": "io.models", "load_model": "io.models",
    "make_runtime": "io.models", "AttackSettings": "evaluate.attacks", "run_attacks": "evaluate.attacks",
    "UnlearnSettings": "runs.config", "RunResult": "runs.run", "unlearn": "runs.run", "compare": "runs.compare",
}

if TYPE_CHECKING:
    from .errors import InputError
    from .evaluate.attacks import AttackSettings, run_attacks
    from .io.models import Runtime, load_model, make_runtime
    from .io.sets import Sequence, load_set
    from .measure.audit import AuditResult, AuditSettings, SequenceResult, audit
    from .measure.band import Band, LossBand, calibrate, calibrate_loss
    from .runs.compare import compare
    from .runs.config import UnlearnSettings
    from .runs.run import RunResult, unlearn


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'unmemorize' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])


__all__ = ["AttackSettings", "AuditResult", "AuditSettings", "Band", "InputError", "LossBand", "RunResult",
           "Runtime", "Sequence", "SequenceResult", "UnlearnSettings", "__version__", "audit", "calibrate",
           "calibrate_loss", "compare", "load_model", "load_set", "make_runtime", "run_attacks", "unlearn"]
