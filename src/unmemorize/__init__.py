"""unmemorize: find which training sequences a language model memorized, make it forget them one by one,
and prove it."""

__version__ = "0.1.0"  # first: modules below record it in their outputs

from .audit import AuditResult, AuditSettings, SequenceResult, audit
from .data import Sequence, load_set
from .errors import InputError
from .evaluate.attacks import AttackSettings, run_attacks
from .measure.band import Band, calibrate
from .model import Runtime, load_model, make_runtime
from .unlearn.compare import compare
from .unlearn.config import UnlearnSettings
from .unlearn.run import RunResult, unlearn

__all__ = ["AttackSettings", "AuditResult", "AuditSettings", "Band", "InputError", "RunResult", "Runtime",
           "Sequence", "SequenceResult", "UnlearnSettings", "audit", "calibrate", "compare", "load_model",
           "load_set", "make_runtime", "run_attacks", "unlearn"]
