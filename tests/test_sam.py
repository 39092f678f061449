"""Sharpness-aware unlearning (`--sam-rho`, Fan et al. 2025) on the tiny memorizing model: the perturbed forget
gradient against a hand computation (with a gradient mask, and inside the loop with a retain regularizer at the
unperturbed weights), `sam_rho=0` as the plain step, a run that reaches its target, resume, and bad values."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from accelerate import Accelerator
from clirun import run_cli
from conftest import read_json
from killed import assert_resumes_bit_for_bit
from pydantic import ValidationError
from recorder import Recorder
from test_distributed import TORCHRUN, one_and_two_processes

from unmemorize.io.models import load_model, make_runtime
from unmemorize.runs.config import UnlearnSettings
from unmemorize.runs.run import unlearn
from unmemorize.unlearning import loop
from unmemorize.unlearning.context import Context
from unmemorize.unlearning.methods.ascent import Ascent
from unmemorize.unlearning.retain import retain_loss

RUNTIME = make_runtime("cpu", "float32")
FAST_AUDIT = {"el_n": [], "prefix_tokens": 8, "batch_size": 8}
FAST = ["--el-n", "0", "--prefix-tokens", "8", "--device", "cpu", "--dtype", "float32"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
RHO = 0.5


def mean_logprob(model, sequences: list[list[int]]) -> torch.Tensor:
    """(1/N) sum over the predicted tokens of every sequence of log p(x_t | x_<t), one unpadded sequence at a time:
    the ascent forget loss; minus it, the retain NLL."""
    total, count = torch.zeros(()), 0
    for ids in sequences:
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
        total = total + torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None]).sum()
        count += len(ids) - 1
    return total / count


def gradient(model, loss: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, list(model.parameters())))


def moved_by(model, step: list[torch.Tensor]):
    """A copy of `model` with every parameter moved by `step`."""
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for param, delta in zip(moved.parameters(), step, strict=True):
            param.add_(delta)
    return moved


def norm(tensors: list[torch.Tensor]) -> float:
    return float(torch.linalg.vector_norm(torch.stack([t.norm() for t in tensors])))


def distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """||a - b|| / ||b|| over all the tensors."""
    return norm([x - y for x, y in zip(a, b, strict=True)]) / norm(b)


def rows(batch) -> list[list[int]]:
    """The unpadded token ids of a (right-padded) batch."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(batch.input_ids, batch.mask, strict=True)]


def test_sam_gradient_is_the_forget_gradient_at_the_worst_masked_perturbation(tiny_loaded):
    model, _, _ = tiny_loaded
    model = copy.deepcopy(model)
    params = list(model.parameters())
    original = [p.detach().clone() for p in params]
    forget = [list(range(3, 20)), [5, 9, 14, 3, 22, 40, 7, 8]]
    generator = torch.Generator().manual_seed(0)
    masks = [(torch.rand(p.shape, generator=generator) < 0.5).float() for p in params]

    # by hand: g = M * grad l(w), eps = rho g / ||g||, then M * grad l(w + eps)
    g = [m * d for m, d in zip(masks, gradient(model, mean_logprob(model, forget)), strict=True)]
    eps = [RHO * t / norm(g) for t in g]
    assert all(float(e[m == 0].abs().max()) == 0 for e, m in zip(eps, masks, strict=True))  # frozen weights stay
    perturbed = moved_by(model, eps)
    expected = [m * d for m, d in zip(masks, gradient(perturbed, mean_logprob(perturbed, forget)), strict=True)]
    plain = g

    loop.sam_gradient(Accelerator(cpu=True), params, dict(zip(params, masks, strict=True)), RHO,
                      mean_logprob(model, forget), lambda: mean_logprob(model, forget))
    loop.mask_gradients(dict(zip(params, masks, strict=True)))  # as the loop does after the regularizers
    got = [p.grad for p in params]
    assert distance(got, expected) < 1e-5
    assert distance(plain, expected) > 0.05  # the perturbation matters at this radius: the check has teeth
    assert all(torch.equal(p, w) for p, w in zip(params, original, strict=True))  # back at w, bit for bit


def test_sam_gradient_leaves_a_zero_gradient_alone(tiny_loaded):
    model, _, _ = tiny_loaded
    model = copy.deepcopy(model)
    params = list(model.parameters())
    calls = []
    zero = sum((p * 0).sum() for p in params)
    loop.sam_gradient(Accelerator(cpu=True), params, None, RHO, zero, lambda: calls.append(1))
    assert not calls and all(float(p.grad.abs().max()) == 0 for p in params)


def one_step(tiny, general, out, monkeypatch, **options) -> Recorder:
    """One gd step (ascent on every forget sequence + NLL on a retain batch) with `options`, recorded."""
    recorder = Recorder(monkeypatch)
    settings = UnlearnSettings(method="gd", lr=1e-3, stop="steps", max_steps=1, max_utility_drop=10.0, target="ma",
                               audit=FAST_AUDIT, **options)
    sets = {k: v for k, v in tiny["sets"].items() if k in ("forget", "holdout", "retain")}
    try:
        unlearn(str(tiny["model"]), sets, general, settings, RUNTIME, out)
    finally:
        recorder.close()
    assert len(recorder.steps) == 1
    return recorder


def test_one_sam_step_of_the_loop_against_a_hand_computation(tiny, general, tmp_path, monkeypatch):
    recorder = one_step(tiny, general, tmp_path / "out", monkeypatch, sam_rho=RHO)
    (forget, retain), again = recorder.calls[0], recorder.calls[1]
    assert len(recorder.calls) == 2 and again[0] is forget and again[1] is retain  # twice, on the same batches
    forget, retain = rows(forget), rows(retain)
    assert len(forget) == 8 and retain
    model, _ = load_model(tiny["model"], RUNTIME)

    # by hand: eps from the forget gradient alone; the forget gradient at w + eps; the retain gradient at w
    g = gradient(model, mean_logprob(model, forget))
    eps = [RHO * t / norm(g) for t in g]
    perturbed = moved_by(model, eps)
    sam = gradient(perturbed, mean_logprob(perturbed, forget))
    keep = gradient(model, -mean_logprob(model, retain))  # retain_weight 1
    expected = [f + r for f, r in zip(sam, keep, strict=True)]

    weights, grads = recorder.steps[0]["weights"], recorder.steps[0]["grads"]
    assert distance(grads, expected) < 1e-4
    plain = [f + r for f, r in zip(g, keep, strict=True)]
    retain_perturbed = [f + r for f, r in zip(sam, gradient(perturbed, -mean_logprob(perturbed, retain)), strict=True)]
    assert distance(plain, expected) > 0.05  # not the plain step
    assert distance(retain_perturbed, expected) > 1e-2  # the retain term is taken at w, not at w + eps
    assert all(torch.equal(w, p) for w, p in zip(weights, model.parameters(), strict=True))  # the step starts at w

    # Adam's first step from w with that gradient (m = g, v = g^2 after bias correction): w - lr g / (|g| + 1e-8)
    after, _ = load_model(tmp_path / "out" / "model", RUNTIME)
    for param, w, grad in zip(after.parameters(), weights, grads, strict=True):
        torch.testing.assert_close(param, w - 1e-3 * grad / (grad.abs() + 1e-8), rtol=0, atol=1e-6)


def test_sam_rho_zero_is_the_plain_step(tiny, general, tmp_path, monkeypatch):
    """No second forget pass, and the gradient handed to Adam is, bit for bit, one backward of forget + retain."""
    monkeypatch.setattr(loop, "sam_gradient", lambda *args: pytest.fail("sam_gradient called with sam_rho=0"))
    recorder = one_step(tiny, general, tmp_path / "out", monkeypatch, sam_rho=0.0)
    assert len(recorder.calls) == 1
    forget, retain = recorder.calls[0]
    grads = recorder.steps[0]["grads"]
    model, _ = load_model(tiny["model"], RUNTIME)
    ctx = Context(model=model, runtime=RUNTIME, pad_id=0, forget_ids=[])
    loss = Ascent().loss(ctx, forget, retain) + 1.0 * retain_loss("nll", ctx, retain)
    loss.backward()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))


def test_a_sam_run_reaches_its_target_through_the_cli(tiny, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("sam_rho: 0.5\n")  # the flag wins over the YAML
    out = tmp_path / "run"
    result = run_cli("unlearn", "--model", tiny["model"], "--forget", tiny["files"]["forget"], "--holdout",
                     tiny["files"]["holdout"], "--retain", tiny["files"]["retain"], "--general",
                     tiny["files"]["retain"], "--sam-rho", "0.05", "--lr", "1e-3", "--max-steps", "40",
                     "--max-utility-drop", "10", "--config", config, "--out", out, *FAST, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    run = read_json(out / "run.json")
    assert run["settings"]["sam_rho"] == 0.05 and run["target"] == "indistinguishable" and run["target_reached"]
    assert run["forget"]["extractable_after"] == 0 < run["forget"]["extractable_before"]
    lines = [json.loads(line) for line in (out / "trajectory.jsonl").read_text().splitlines()]
    assert len(lines) == run["steps"] + 1 and run["steps"] > 0


def _at_step(checkpoint, step: int) -> None:
    assert json.loads((checkpoint / "state.json").read_text())["step"] == step


def test_a_sam_run_resumes_to_the_same_result(tiny, general, tmp_path, monkeypatch):
    settings = UnlearnSettings(method="gd", lr=3e-4, sam_rho=RHO, stop="steps", max_steps=4, checkpoint_every=2,
                               max_utility_drop=10.0, target="ma", audit=FAST_AUDIT)
    sets = {k: v for k, v in tiny["sets"].items() if k in ("forget", "holdout", "retain")}
    assert_resumes_bit_for_bit(tiny["model"], sets, general, settings, RUNTIME, tmp_path, monkeypatch,
                               between=lambda checkpoint: _at_step(checkpoint, 2))


def test_sam_moves_only_the_masked_weights(tiny, general, tmp_path):
    settings = UnlearnSettings(method="ga", lr=3e-4, sam_rho=RHO, mask_fraction=0.05, stop="steps", max_steps=3,
                               max_utility_drop=10.0, target="ma", audit=FAST_AUDIT)
    sets = {k: v for k, v in tiny["sets"].items() if k in ("forget", "holdout", "retain")}
    result = unlearn(str(tiny["model"]), sets, general, settings, RUNTIME, tmp_path / "out")
    original, _ = load_model(tiny["model"], RUNTIME)
    unlearned, _ = load_model(tmp_path / "out" / "model", RUNTIME)
    changed = sum(int((a != b).sum()) for a, b in zip(original.parameters(), unlearned.parameters(), strict=True))
    assert 0 < changed <= 0.05 * sum(p.numel() for p in original.parameters()) + 1
    assert result.run["steps"] == 3


@pytest.mark.parametrize(("flag", "yaml"), [("-0.1", None), (None, "sam_rho: -1\n")])
def test_a_negative_sam_rho_exits_2_with_one_line(tiny, tmp_path, flag, yaml):
    extra = ["--sam-rho", flag] if flag is not None else []
    if yaml is not None:
        (tmp_path / "config.yaml").write_text(yaml)
        extra = ["--config", tmp_path / "config.yaml"]
    out = tmp_path / "out"
    result = run_cli("unlearn", "--model", tiny["model"], "--forget", tiny["files"]["forget"], "--holdout",
                     tiny["files"]["holdout"], *extra, "--out", out, *FAST, env=ONE_THREAD)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--sam-rho: Input should be greater than or equal to 0" in lines[0], result.stderr
    assert not out.exists() and not out.with_name("out.partial").exists()


@pytest.mark.parametrize("rho", [float("nan"), float("inf")])
def test_sam_rho_must_be_finite(rho):
    with pytest.raises(ValidationError, match="sam_rho"):
        UnlearnSettings(sam_rho=rho)
    assert UnlearnSettings().sam_rho == 0.0  # off by default


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to this Python")
def test_two_processes_match_one_under_sam(tiny, tmp_path):
    """DDP: the perturbation comes from the all-reduced forget gradient (the same on both processes) and the
    retain gradient, taken after it, joins the perturbed forget gradient in .grad: the one-process run's steps."""
    options = ["--method", "gd", "--sam-rho", str(RHO), "--lr", "1e-3", "--stop", "steps", "--max-steps", "3",
               "--max-utility-drop", "10", "--general", str(tiny["files"]["retain"]), *FAST]

    def arguments(out):
        return ["unlearn", "--model", str(tiny["model"]), "--forget", str(tiny["files"]["forget"]), "--holdout",
                str(tiny["files"]["holdout"]), "--retain", str(tiny["files"]["retain"]), *options, "--out", str(out)]

    one_and_two_processes(arguments, tmp_path, steps=3, keys=("loss", "forget_loss"))
