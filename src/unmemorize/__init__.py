"""unmemorize: find which training sequences a language model memorized, make it forget them one by one,
and prove it."""

from ._version import __version__
from .errors import InputError
from .evaluate.attacks import AttackSettings, run_attacks
from .io.models import Runtime, load_model, make_runtime
from .io.sets import Sequence, load_set
from .measure.audit import AuditResult, AuditSettings, SequenceResult, audit
from .measure.band import Band, calibrate
from .runs.compare import compare
from .runs.config import UnlearnSettings
from .runs.run import RunResult, unlearn

__all__ = [
           "AttackSettings",
           "AuditResult",
           "AuditSettings",
           "Band",
           "InputError",
           "RunResult",
           "Runtime",
           "Sequence",
           "SequenceResult",
           "UnlearnSettings",
           "__version__",
           "audit",
           "calibrate",
           "compare",
           "load_model",
           "load_set",
           "make_runtime",
           "run_attacks",
           "unlearn",
]
