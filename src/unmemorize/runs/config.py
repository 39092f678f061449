"""A run's settings: the unlearning loop's, and what is evaluated around it."""

from __future__ import annotations

from pydantic import Field

from ..evaluate.suite import EvaluationSettings
from ..unlearning.config import LoopSettings


class UnlearnSettings(LoopSettings):
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)
