"""Dataset loader of the `unmemorize_pyfacts` lm-eval task (referenced from its YAML as `!function pyfacts.load`).

lm-eval loads this file by path, so the JSONL is found next to it however the package was installed; a
`dataset_path: json` with `data_files` would be resolved against the working directory instead.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets

QUESTIONS = Path(__file__).with_name("pyfacts.jsonl")


def load(**_metadata) -> dict[str, datasets.Dataset]:
    """{"test": the questions}. lm-eval passes the task's metadata as keyword arguments; none is needed."""
    rows = [json.loads(line) for line in QUESTIONS.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {"test": datasets.Dataset.from_list(rows, split=datasets.Split.TEST)}
