"""Sharded unlearning (FSDP2) on CPU over gloo: two processes that shard the model give the run of one process.

Under FSDP (ACCELERATE_USE_FSDP=true, set by `accelerate launch` with docs/accelerate/fsdp.yaml) each process
holds only its shards of the weights, the gradients, the Adam state, the gradient mask, the best state and the
frozen original model; the sharded checkpoint is resumed; at the end the full weights are gathered and saved.
Every number the run reports must then agree with one plain process: per-sequence MA within 1e-4 at every step
and after, losses within 1e-4, the same stop reason and target decision, the same saved weights.

Three launches cover everything (each costs a few seconds of start-up per process):
  - `ga` with a gradient mask and the utility guard restoring the best state, killed after a sharded checkpoint
    (by torchrun, FSDP asked for in the environment) and resumed (by `accelerate launch` with the shipped config);
  - `npo_kl` with LoRA, neighbours and SAM: the sharded original model for both KL terms, the adapters sharded,
    SAM's norm over every shard;
and the default method, `hinge`, which traces the request and trains only the MLPs of the layers it finds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
from safetensors.torch import load_file
from test_distributed import rank_exit_codes, read_run
from tiny import sentences

from unmemorize.errors import InputError
from unmemorize.io.sets import Sequence, write_jsonl
from unmemorize.unlearning.checkpoint import load_checkpoint, load_sharded
from unmemorize.unlearning.fsdp import fsdp_requested

BIN = Path(sys.executable).parent
CONFIG = Path(__file__).parents[1] / "docs" / "accelerate" / "fsdp.yaml"
COMMON = ["--device", "cpu", "--dtype", "float32", "--stop", "steps", "--lr", "3e-4", "--el-n", "3",
          "--prefix-tokens", "8"]
TOL = 1e-4
SHARDED = "FSDP: the model is sharded over 2 processes"
needs_launchers = pytest.mark.skipif(not (BIN / "torchrun").exists() or not (BIN / "accelerate").exists(),
                                     reason="torchrun and accelerate are not installed next to this Python")


def arguments(tiny, general: Path, out: Path, *extra) -> list[str]:
    files = tiny["files"]
    return ["unlearn", "--model", str(tiny["model"]), "--forget", str(files["forget"]), "--holdout",
            str(files["holdout"]), "--retain", str(files["retain"]), "--general", str(general), *COMMON,
            *map(str, extra), "--out", str(out)]


def start(args: list[str], launcher: str | None = None) -> subprocess.Popen:
    """One plain process (launcher None), two under `torchrun` with FSDP asked for in the environment, or two
    under `accelerate launch --config_file docs/accelerate/fsdp.yaml`, which asks for it itself."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("ACCELERATE_USE_FSDP", "FSDP_VERSION"):
        env.pop(name, None)
    command = [sys.executable, "-m", "unmemorize"]
    if launcher == "torchrun":  # --standalone: a rendezvous on a free port
        command = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "unmemorize"]
        env["ACCELERATE_USE_FSDP"] = "true"
    elif launcher == "accelerate":
        command = [str(BIN / "accelerate"), "launch", "--config_file", str(CONFIG), "--main_process_port", "0",
                   "-m", "unmemorize"]
    return subprocess.Popen([*command, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process under it (torchrun starts each rank in a session of its own)."""
    for child in [*psutil.Process(process.pid).children(recursive=True), psutil.Process(process.pid)]:
        child.send_signal(signal.SIGKILL)
    process.communicate()


def finished(process: subprocess.Popen) -> str:
    """stderr of a complete run: exit 0, or 3 (the target is not reached in so few steps), which a launcher
    reports as a failure of the ranks that exited 3 (and SIGTERM for one it stopped after that)."""
    _, stderr = process.communicate(timeout=600)
    if process.args[0] == sys.executable:
        assert process.returncode in (0, 3), stderr[-3000:]
    else:
        codes = rank_exit_codes(process.returncode, stderr)
        assert process.returncode == 0 or (3 in codes and set(codes) <= {3, -15}), (codes, stderr[-3000:])
    return stderr


def assert_same_run(one: Path, two: Path) -> None:
    """The per-sequence MA at every step and after, the losses, the decisions and the saved weights agree."""
    a, b = read_run(one), read_run(two)
    assert len(a["trajectory"]) == len(b["trajectory"]) > 2
    for x, y in zip(a["trajectory"], b["trajectory"], strict=True):
        assert x["step"] == y["step"] and x["active"] == y["active"] and x["ma"].keys() == y["ma"].keys()
        assert all(abs(x["ma"][k] - y["ma"][k]) < TOL for k in x["ma"]), (x["step"], x["ma"], y["ma"])
        for key in ("loss", "forget_loss", "retain_loss", "neighbour_kl"):
            assert (x.get(key) is None) == (y.get(key) is None), (x["step"], key)
            if x.get(key) is not None:
                assert abs(x[key] - y[key]) < TOL, (x["step"], key, x[key], y[key])
    forget = [{s["id"]: s for s in run["after"]["sequences"] if s["set"] == "forget"} for run in (a, b)]
    assert forget[0].keys() == forget[1].keys() and len(forget[0]) == 8
    for name, x in forget[0].items():
        y = forget[1][name]
        assert abs(x["ma"] - y["ma"]) < TOL and abs(x["loss"] - y["loss"]) < TOL, (name, x, y)
    for key in ("steps", "stop_reason", "restored_step", "target_reached"):
        assert a["run"][key] == b["run"][key], key
    assert a["run"]["tokens"]["backward"] == b["run"]["tokens"]["backward"]
    assert abs(a["run"]["utility"]["after"]["general_ppl"] - b["run"]["utility"]["after"]["general_ppl"]) < 1e-3
    # the gathered checkpoint: every tensor of the one-process model, with its values
    weights = [load_file(run / "model" / "model.safetensors") for run in (one, two)]
    assert weights[0].keys() == weights[1].keys()
    assert max(float((weights[0][k] - weights[1][k]).abs().max()) for k in weights[0]) < 1e-5
    # the unlearning really moved the model
    before = {s["id"]: s for s in json.loads((one / "before.json").read_text())["sequences"] if s["set"] == "forget"}
    assert sum(abs(forget[0][k]["loss"] - before[k]["loss"]) for k in before) > 0.01


@needs_launchers
def test_fsdp_with_a_mask_restores_the_best_state_and_resumes(tiny, tmp_path):
    general = tmp_path / "general.jsonl"
    write_jsonl(general, tiny["sets"]["holdout"])
    config = tmp_path / "config.yaml"
    # the guard checks every 2 steps and, at step 6, restores the best state of step 4 (utility fell 6.2% > 6%)
    config.write_text("guard_every: 2\ncheckpoint_every: 2\n")
    extra = ["--method", "ga", "--max-steps", "6", "--mask-fraction", "0.3", "--max-utility-drop", "0.06",
             "--config", config]
    out = tmp_path / "two"
    killed = start(arguments(tiny, general, out, *extra), "torchrun")
    single = start(arguments(tiny, general, tmp_path / "one", *extra))
    checkpoint = tmp_path / "two.partial" / "checkpoint"
    deadline = time.time() + 300
    # killed once the checkpoint of step 4 holds the best state (of step 4) that the guard restores at step 6
    while time.time() < deadline and not ((checkpoint / "state.json").exists()
                                          and json.loads((checkpoint / "state.json").read_text())["step"] >= 4):
        time.sleep(0.05)
    kill_tree(killed)
    assert not out.exists() and {".metadata", "__0_0.distcp", "__1_0.distcp"} <= {p.name for p in checkpoint.iterdir()}

    resumed = finished(start([*arguments(tiny, general, out, *extra), "--resume"], "accelerate"))
    finished(single)
    assert SHARDED in resumed
    assert not (tmp_path / "two.partial").exists()
    assert read_run(tmp_path / "one")["run"]["restored_step"] == 4
    assert_same_run(tmp_path / "one", out)


@needs_launchers
def test_fsdp_with_lora_and_a_sharded_reference_model(tiny, tmp_path):
    general = tmp_path / "general.jsonl"
    write_jsonl(general, tiny["sets"]["holdout"])
    neighbours = tmp_path / "neighbours.jsonl"
    write_jsonl(neighbours, [Sequence(f"n{i}", text) for i, text in enumerate(sentences(8, 7))])
    extra = ["--method", "npo_kl", "--lora", "4", "--max-steps", "4", "--lr", "3e-3", "--neighbours", neighbours,
             "--sam-rho", "0.05", "--max-utility-drop", "5"]
    launched = start(arguments(tiny, general, tmp_path / "two", *extra), "torchrun")
    single = start(arguments(tiny, general, tmp_path / "one", *extra))
    finished(single)
    assert SHARDED in finished(launched)
    assert_same_run(tmp_path / "one", tmp_path / "two")
    kl = [line for line in read_run(tmp_path / "two")["trajectory"] if line.get("neighbour_kl") is not None]
    assert kl[0]["neighbour_kl"] < 1e-6 < kl[-1]["neighbour_kl"]  # the reference is the original model


@needs_launchers
def test_fsdp_with_hinge_localized_by_default(tiny, tmp_path):
    """The default method traces the request and trains only the MLPs (every other weight frozen inside the
    shards): two processes give the one-process run, and only the MLP weights move."""
    general = tmp_path / "general.jsonl"
    write_jsonl(general, tiny["sets"]["holdout"])
    extra = ["--max-steps", "4", "--lr", "1e-3", "--max-utility-drop", "5"]
    launched = start(arguments(tiny, general, tmp_path / "two", *extra), "torchrun")
    single = start(arguments(tiny, general, tmp_path / "one", *extra))
    finished(single)
    assert SHARDED in finished(launched)
    assert_same_run(tmp_path / "one", tmp_path / "two")
    assert read_run(tmp_path / "two")["run"]["settings"]["localize"] == "causal:6"
    before = load_file(tiny["model"] / "model.safetensors")
    after = load_file(tmp_path / "two" / "model" / "model.safetensors")
    moved = {name for name in before if not (before[name] == after[name]).all()}
    assert moved and all(".mlp." in name for name in moved), moved


def test_fsdp_is_asked_for_by_the_environment(monkeypatch):
    for name in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "FSDP_OFFLOAD_PARAMS", "FSDP_ACTIVATION_CHECKPOINTING"):
        monkeypatch.delenv(name, raising=False)
    two, one = SimpleNamespace(num_processes=2), SimpleNamespace(num_processes=1)
    assert not fsdp_requested(two)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert fsdp_requested(two) and not fsdp_requested(one)
    with pytest.raises(InputError, match="--optimizer sophia: not supported under FSDP"):
        fsdp_requested(two, SimpleNamespace(optimizer="sophia", harden="none"))
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    with pytest.raises(InputError, match="fsdp_offload_params"):
        fsdp_requested(two)
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(InputError, match="only FSDP2"):
        fsdp_requested(two)


def test_a_checkpoint_is_resumed_in_the_mode_it_was_written(tmp_path):
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "state.json").write_text("{}")
    with pytest.raises(InputError, match="written without FSDP"):
        load_sharded(tmp_path, None, None, [])
    (folder / ".metadata").write_bytes(b"")
    with pytest.raises(InputError, match="is sharded"):
        load_checkpoint(tmp_path, None, None)
