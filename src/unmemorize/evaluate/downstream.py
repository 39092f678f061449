"""Downstream tasks through lm-evaluation-harness, on the model in memory (no checkpoint round trip).

Any lm-eval task name works (its dataset must be downloadable, or already in the datasets cache), and so do
unmemorize's own offline tasks in `tasks/` next to this file (`unmemorize_pyfacts`: 44 four-choice questions
about Python's builtins and standard library).

lm-eval is an optional dependency (`pip install unmemorize[eval]`); it is imported only when this runs.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError

TASKS_DIR = Path(__file__).with_name("tasks")


def downstream(model, tokenizer, tasks: list[str], *, limit: int | None = None, batch_size: int = 8,
               device: str | torch.device | None = None, compute_dtype: torch.dtype | None = None) -> dict:
    """{task: {metric: value, ..., "n_docs": int}} for every task (and group) lm-eval reports.

    Metrics are lm-eval's (`acc`, `acc_norm`, their `_stderr`, ...); a metric computed after a filter other
    than lm-eval's default keeps its `metric,filter` name. Non-numeric values (lm-eval's "N/A") are dropped.

    `limit` caps the documents per task (the first ones: a quick check, not a benchmark score). The model runs
    where it is: `device`, when given, must agree with it (lm-eval ignores its own device argument for a model
    object). `compute_dtype` autocasts the forward passes (pass `Runtime.compute`); lm-eval never casts the
    weights of a model object, so without it a float32 model runs in float32.
    Raises InputError naming the task when a task is unknown or its dataset cannot be loaded.
    """
    if not tasks:
        raise InputError("downstream: no task given")
    if limit is not None and limit < 1:
        raise InputError(f"downstream: limit must be at least 1, got {limit}")
    _check_device(model, device)
    lm_eval, task_manager_class, hflm_class = _import_lm_eval()
    with _quiet_lm_eval():
        manager = _task_manager(task_manager_class, tasks)
        loaded = [item for name in tasks for item in _load_task(manager, name)]
        with _kept_rng_state(), _kept_training_flag(model):
            # lm-eval may set a pad token on the tokenizer it is given; the caller's tokenizer stays as it was.
            lm = hflm_class(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size,
                            mixed_precision_dtype=compute_dtype)
            out = lm_eval.simple_evaluate(lm, tasks=loaded, task_manager=manager, limit=limit, log_samples=False,
                                          bootstrap_iters=1000)
    docs = out.get("n-samples", {})
    return {name: {**_numeric_metrics(row), **({"n_docs": int(docs[name]["effective"])} if name in docs else {})}
            for name, row in out["results"].items()}


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise InputError("downstream tasks need lm-eval: pip install 'unmemorize[eval]'") from None
    return lm_eval, TaskManager, HFLM


def _check_device(model, device: str | torch.device | None) -> None:
    if device is not None and torch.device(device).type != model.device.type:
        raise ValueError(f"downstream: the model is on {model.device}, not on {device}; move it first")


def _task_manager(task_manager_class, tasks: list[str]):
    """Our own tasks only, when that is all that is asked for: indexing lm-eval's thousands of task files
    takes seconds."""
    own = task_manager_class(include_path=str(TASKS_DIR), include_defaults=False)
    if all(name in own.all_tasks for name in tasks):
        return own
    return task_manager_class(include_path=str(TASKS_DIR))


def _load_task(manager, name: str) -> list:
    """The Task (or Group) objects of one name; loading also fetches the task's dataset."""
    if name not in manager.all_tasks and not Path(name).is_file():
        raise InputError(f"downstream task {name!r}: unknown (neither an lm-eval task, group or tag, "
                         f"nor one of unmemorize's own)")
    try:
        loaded = manager.load([name])
    except Exception as error:  # datasets raises ConnectionError, FileNotFoundError, ValueError ... when offline
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"downstream task {name!r}: cannot load it: {first}") from None
    groups = loaded.get("groups", {})
    # A group is evaluated as a group (lm-eval then reports its aggregate too); a tag is just its tasks.
    return [groups[name]] if name in groups else list(loaded["tasks"].values())


def _numeric_metrics(row: dict) -> dict[str, float]:
    """lm-eval names results `metric,filter`; keep finite numbers, and the bare metric name for the default
    filter ("none")."""
    metrics = {}
    for key, value in row.items():
        if "," not in key or isinstance(value, bool) or not isinstance(value, int | float):
            continue  # "alias", "name", "sample_len", and stderrs lm-eval could not compute ("N/A")
        if not math.isfinite(value):
            continue
        metric, _, filter_name = key.partition(",")
        metrics[metric if filter_name == "none" else key] = float(value)
    return metrics


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval logs warnings meant for its own command line (e.g. about passing a model object)."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _kept_rng_state() -> Iterator[None]:
    """simple_evaluate reseeds Python, NumPy and torch; a run that evaluates midway must not lose its stream."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def _kept_training_flag(model) -> Iterator[None]:
    """HFLM switches the model to eval mode; give it back as it came."""
    training = model.training
    try:
        yield
    finally:
        model.train(training)
