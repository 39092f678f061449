"""unmemorize: find which training sequences a language model memorized, make it forget them one by one,
and prove it."""

from .audit import AuditResult, AuditSettings, SequenceResult, audit
from .data import Sequence, load_set
from .errors import InputError
from .measure.band import Band, calibrate
from .model import Runtime, load_model, make_runtime

__version__ = "0.1.0"
__all__ = ["AuditResult", "AuditSettings", "Band", "InputError", "Runtime", "Sequence", "SequenceResult",
           "audit", "calibrate", "load_model", "load_set", "make_runtime"]
