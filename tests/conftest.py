from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny import build_tiny_model

from unmemorize.io.sets import write_jsonl


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict:
    """A trained tiny model folder and its sets written as JSONL files."""
    root = tmp_path_factory.mktemp("tiny")
    sets = build_tiny_model(root / "model")
    files = {}
    for name, sequences in sets.items():
        files[name] = root / f"{name}.jsonl"
        write_jsonl(files[name], sequences)
    return {"model": root / "model", "sets": sets, "files": files}


@pytest.fixture(scope="session")
def tiny_oracle(tmp_path_factory) -> Path:
    """The tiny model's recipe without the forget set (the oracle of exact unlearning)."""
    folder = tmp_path_factory.mktemp("tiny-oracle") / "model"
    build_tiny_model(folder, oracle=True)
    return folder


@pytest.fixture(scope="session")
def tiny_loaded(tiny):
    from unmemorize.io.models import load_model, make_runtime

    runtime = make_runtime("cpu", "float32")
    model, tokenizer = load_model(tiny["model"], runtime)
    return model, tokenizer, runtime


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
