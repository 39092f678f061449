from __future__ import annotations

import json
import os
from pathlib import Path

# Under pytest-xdist (`make test` runs `-n auto`) the workers share the cores: each worker, and every process it
# starts, gets its share of them as torch threads instead of all of them (oversubscribed threads run slower).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))
    os.environ.setdefault("MKL_NUM_THREADS", os.environ["OMP_NUM_THREADS"])

import pytest
from tiny import build_tiny_model

from unmemorize.io.sets import write_jsonl

# UNMEMORIZE_TEST_FP32=1 runs the suite as a CPU without fast bfloat16 would (AVX2 only, e.g. AMD EPYC):
# `make_runtime()` picks no autocast, here and in every process the tests start (tests/fp32_site/
# sitecustomize.py, put on PYTHONPATH). With ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2
# MKL_ENABLE_INSTRUCTIONS=AVX2 the float32 kernels are the AVX2 ones too, so an AVX-512/AMX machine
# reproduces that CPU's numerics.
if os.environ.get("UNMEMORIZE_TEST_FP32") == "1":
    import unmemorize.io.models as _models

    _site = str(Path(__file__).parent / "fp32_site")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_site, os.environ.get("PYTHONPATH")]))
    _fast = _models._bf16_is_fast
    _models._bf16_is_fast = lambda device: device.type != "cpu" and _fast(device)


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
def general() -> list:
    """General text for a tiny run's utility guard: ten record-like sentences no tiny model trained on."""
    from tiny import sentences

    from unmemorize.io.sets import Sequence

    return [Sequence(f"g{i}", text) for i, text in enumerate(sentences(10, seed=99))]


@pytest.fixture(scope="session")
def tiny_loaded(tiny):
    from unmemorize.io.models import load_model, make_runtime

    runtime = make_runtime("cpu", "float32")
    model, tokenizer = load_model(tiny["model"], runtime)
    return model, tokenizer, runtime


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
