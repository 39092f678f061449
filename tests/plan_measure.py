"""Measure the peak memory of a few real unlearning steps, in a process of its own (`tests/test_plan.py`).

    python plan_measure.py '{"model": DIR, "method": "ga", "batch": 64, "length": 127, ...}'

prints {"increase": bytes, "seconds": ...}: the peak resident set of the run (VmHWM) minus the resident set before
the model loads. Imports, the model's classes and the kernels are warmed up first (a load and a backward on three
tokens, then freed), and the peak is reset (/proc/self/clear_refs), so the increase is what the run itself holds:
the weights, the loop's tensors and what comes and goes. `warm` (default: the model) is the model loaded for the
warm-up: a small one of the same family spares loading a large one twice. Run it with MALLOC_MMAP_THRESHOLD_ set
(the test does): glibc's heap otherwise keeps freed blocks of a few MB mapped, and the resident set then overstates
the tensors (measured: 180 MB resident for 93 MB of live tensors on the tiny model).

The sequences are random token ids of `length` - (i % 5) tokens (padded batches, as real records are), sets of
their own: `batch` forget sequences, 8 holdout, `retain` retain sequences (0: none; `retain_loss` as --retain-loss),
4 general. The loop runs
`steps` (2) steps of `method` with --stop steps and the utility guard every 2 steps (so the best state is replaced
once), through `unlearning.session.unlearn_model`, the entry point `unlearn` uses.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import accelerate
import torch

from unmemorize.io.models import load_model, make_runtime
from unmemorize.measure.utility import utility
from unmemorize.unlearning.config import LoopSettings
from unmemorize.unlearning.context import TokenSets
from unmemorize.unlearning.session import unlearn_model


def status(field: str) -> int:
    """A memory field of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def main(options: dict) -> dict:
    start = time.perf_counter()
    runtime = make_runtime("cpu", options.get("dtype", "float32"))
    if options.get("lora"):
        import peft  # noqa: F401  (imported before the baseline, as the rest)
    warm, _ = load_model(options.get("warm", options["model"]), runtime)  # a smaller model of the same family will do
    warm(input_ids=torch.tensor([[3, 4, 5]])).logits.sum().backward()
    del warm, _
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) is now the current resident set
    base = status("VmRSS")

    model, tokenizer = load_model(options["model"], runtime)
    generator = torch.Generator().manual_seed(0)
    length, vocab = options["length"], model.config.vocab_size

    def sequences(count: int) -> list[list[int]]:
        return [torch.randint(3, vocab, (length - i % 5,), generator=generator).tolist() for i in range(count)]

    batch, retain = options["batch"], options.get("retain", 0)
    sets = TokenSets(forget=sequences(batch), forget_names=[f"f{i}" for i in range(batch)], holdout=sequences(8),
                     retain=sequences(retain) if retain else None, general=sequences(4))
    settings = LoopSettings(method=options["method"], lora=options.get("lora", 0), max_steps=options.get("steps", 2),
                            retain_loss=options.get("retain_loss"),
                            stop="steps", lr=1e-6, guard_every=2, retain_batch=max(retain, 1),
                            audit={"batch_size": options.get("score_batch", 8), "el_n": []})
    before = utility(model, sets.retain, sets.general, runtime, settings.audit.batch_size, 0)
    with tempfile.TemporaryDirectory() as work:
        unlearn_model(model, tokenizer, settings, sets, runtime, Path(work), before, accelerate.Accelerator(cpu=True))
    return {"increase": status("VmHWM") - base, "base": base, "seconds": round(time.perf_counter() - start, 1)}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
