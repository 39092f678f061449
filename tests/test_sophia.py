"""Second-order unlearning (`--optimizer sophia`, Sophia as SOUL uses it): the update and the Hessian EMA against a
hand computation on a few weights; one step of the loop (the GNB refresh on the forget batch, then the clipped
step) against a hand computation on the tiny memorizing model; Hutchinson's estimate against a known Hessian; a
run that reaches its target through the CLI; resume; --mask-fraction and --lora; bad values; data parallel."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from accelerate import Accelerator
from clirun import run_cli
from conftest import read_json
from killed import assert_resumes_bit_for_bit
from recorder import Recorder
from test_distributed import TORCHRUN, one_and_two_processes

from unmemorize.cli import unlearn_settings
from unmemorize.errors import InputError
from unmemorize.io.models import load_model, make_runtime
from unmemorize.io.sets import Sequence
from unmemorize.runs.config import UnlearnSettings
from unmemorize.runs.run import unlearn
from unmemorize.unlearning.context import SEQUENCES, Batch, Context
from unmemorize.unlearning.sophia import Sophia, hutchinson_estimate

RUNTIME = make_runtime("cpu", "float32")
FAST_AUDIT = {"el_n": [], "prefix_tokens": 8, "batch_size": 8}
FAST = ["--el-n", "0", "--prefix-tokens", "8", "--device", "cpu", "--dtype", "float32"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
BETA1, BETA2 = 0.9, 0.95  # the documented defaults


@pytest.fixture(scope="module")
def general():
    from tiny import sentences

    return [Sequence(f"g{i}", text) for i, text in enumerate(sentences(10, seed=99))]


def tiny_sets(tiny) -> dict:
    return {k: v for k, v in tiny["sets"].items() if k in ("forget", "holdout", "retain")}


def clip(z: torch.Tensor) -> torch.Tensor:
    return torch.clamp(z, -1.0, 1.0)


def test_the_update_and_the_hessian_ema_against_a_hand_computation():
    """Three steps with a refresh before the first and the third (k = 2): m, h and the weights by hand, with weight
    decay, a Newton step, clipped steps, a negative and a zero curvature (eps), a weight without gradient."""
    lr, gamma, eps, decay = 0.1, 0.5, 1e-3, 0.2
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5, 3.0]))
    v = torch.nn.Parameter(torch.tensor([[0.2, -0.1]]))
    optimizer = Sophia([w, v], lr=lr, betas=(BETA1, BETA2), gamma=gamma, eps=eps, weight_decay=decay)

    def step(grads):
        w.grad, v.grad = grads
        optimizer.step()

    hhat1 = [torch.tensor([40.0, 0.01, -3.0, 1.0]), torch.tensor([[2.0, 0.0]])]
    g1 = [torch.tensor([2.0, 1.0, -1.0, 0.0]), torch.tensor([[-4.0, 0.5]])]
    optimizer.update_hessian(hhat1)
    step(g1)
    # t = 1: m = 0.1 g, h = 0.05 hhat
    #   w0: m 0.2, gamma h = 1.0 -> ratio 0.2 (a Newton step);  w1: gamma h = 2.5e-4 < eps -> 0.1 / 1e-3 = 100, clipped
    #   w2: h < 0 -> eps: -100, clipped;  w3: m = 0, no step;  v: ratio -0.4 / 0.05 = -8 and 0.05 / eps = 50, clipped
    expected_w = torch.tensor([1.0, -2.0, 0.5, 3.0]) * (1 - lr * decay) - lr * torch.tensor([0.2, 1.0, -1.0, 0.0])
    expected_v = torch.tensor([[0.2, -0.1]]) * (1 - lr * decay) - lr * torch.tensor([[-1.0, 1.0]])
    torch.testing.assert_close(w.detach(), expected_w)
    torch.testing.assert_close(v.detach(), expected_v)
    assert optimizer.clipped == pytest.approx(4 / 6)  # w1, w2, v00, v01; w0 took a Newton step, w3 none
    m = [0.1 * g for g in g1]
    h = [0.05 * e for e in hhat1]
    torch.testing.assert_close(optimizer.state[w]["exp_avg"], m[0])
    torch.testing.assert_close(optimizer.state[v]["hessian"], h[1])

    # t = 2: no refresh (h as it was); t = 3: refresh, h = 0.95 h + 0.05 hhat2
    weights = [w.detach().clone(), v.detach().clone()]
    g2 = [torch.tensor([-1.0, 0.5, 0.25, 8.0]), torch.tensor([[3.0, -2.0]])]
    step(g2)
    m = [BETA1 * a + (1 - BETA1) * b for a, b in zip(m, g2, strict=True)]
    for param, before, mi, hi in zip((w, v), weights, m, h, strict=True):
        ratio = mi / torch.clamp(gamma * hi, min=eps)
        torch.testing.assert_close(param.detach(), before * (1 - lr * decay) - lr * clip(ratio))
    hhat3 = [torch.tensor([0.5, 100.0, 4.0, 2.0]), torch.tensor([[7.0, 30.0]])]
    g3 = [torch.tensor([0.3, -0.2, 0.1, 1.0]), torch.tensor([[0.0, 1.0]])]
    resumed = Sophia([torch.nn.Parameter(w.detach().clone()), torch.nn.Parameter(v.detach().clone())], lr=lr,
                     betas=(BETA1, BETA2), gamma=gamma, eps=eps, weight_decay=decay)
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # a checkpoint: m, h and the step counts
    weights = [w.detach().clone(), v.detach().clone()]
    optimizer.update_hessian(hhat3)
    step(g3)
    m = [BETA1 * a + (1 - BETA1) * b for a, b in zip(m, g3, strict=True)]
    h = [BETA2 * a + (1 - BETA2) * b for a, b in zip(h, hhat3, strict=True)]
    newton = 0
    for param, before, mi, hi in zip((w, v), weights, m, h, strict=True):
        ratio = mi / torch.clamp(gamma * hi, min=eps)
        newton += int((ratio.abs() < 1).sum())
        torch.testing.assert_close(param.detach(), before * (1 - lr * decay) - lr * clip(ratio))
        torch.testing.assert_close(optimizer.state[param]["hessian"], hi)
        assert float(optimizer.state[param]["step"]) == 3
    assert 0 < newton < 6 and optimizer.clipped == pytest.approx(1 - newton / 6)
    resumed.update_hessian(hhat3)
    for param, grad in zip(resumed.param_list(), g3, strict=True):
        param.grad = grad
    resumed.step()
    assert all(torch.equal(a, b) for a, b in zip(resumed.param_list(), (w, v), strict=True))


def test_one_step_of_the_loop_against_a_hand_computation(tiny, general, tmp_path, monkeypatch):
    """ga, one step: the GNB estimate on the forget batch at the starting weights (labels sampled by hand from the
    model's own distribution), h = (1 - beta2) hhat, m = (1 - beta1) g, and the clipped step, on the tiny model."""
    lr, gamma = 1e-3, 20.0  # gamma chosen so that the step mixes Newton and clipped coordinates
    recorder = Recorder(monkeypatch, state=("hessian",))
    settings = UnlearnSettings(method="ga", lr=lr, optimizer="sophia", sophia_gamma=gamma, stop="steps", max_steps=1,
                               max_utility_drop=10.0, target="ma", audit=FAST_AUDIT)
    try:
        unlearn(str(tiny["model"]), tiny_sets(tiny), general, settings, RUNTIME, tmp_path / "out")
    finally:
        recorder.close()
    assert len(recorder.steps) == 1 and len(recorder.calls) == 1
    batch, retain = recorder.calls[0]
    model, _ = load_model(tiny["model"], RUNTIME)
    params = list(model.parameters())

    # by hand: sample yhat per position by the inverse CDF of the step's uniforms, then hhat = B * grad(L^)^2
    seed = 2 * (settings.seed * 1_000_003 + 0) + 2  # the loop's seed of step 0's estimate
    nll, count = torch.zeros(()), 0
    for index, ids, mask in zip(batch.indices, batch.input_ids, batch.mask, strict=True):
        ids = ids[mask.bool()]
        logprobs = torch.log_softmax(model(input_ids=ids[None]).logits[0, :-1].float(), -1)
        uniforms = torch.rand(len(ids) - 1, generator=torch.Generator().manual_seed(seed * 1_000_003 + index),
                              dtype=torch.float64)
        cdf = logprobs.detach().exp().cumsum(-1)
        labels = (cdf < (uniforms.float() * cdf[:, -1])[:, None]).sum(-1)  # the first j with cdf_j >= U cdf_V
        nll = nll - logprobs.gather(-1, labels[:, None]).sum()
        count += len(ids) - 1
    grad = torch.autograd.grad(nll / count, params)
    hhat = [count * g * g for g in grad]

    recorded = recorder.steps[0]
    assert all(torch.equal(w, p) for w, p in zip(recorded["weights"], params, strict=True))  # the step starts at w
    for got, want in zip(recorded["hessian"], hhat, strict=True):
        torch.testing.assert_close(got, (1 - BETA2) * want, rtol=1e-4, atol=1e-9)
    after, _ = load_model(tmp_path / "out" / "model", RUNTIME)
    clipped = newton = 0
    for param, w, g, h in zip(after.parameters(), recorded["weights"], recorded["grads"], hhat, strict=True):
        ratio = (1 - BETA1) * g / torch.clamp(gamma * (1 - BETA2) * h, min=1e-12)
        # to 2 float32 ulps of w (kernels round w - step differently), against steps of up to lr = 1e-3
        torch.testing.assert_close(param, w - lr * clip(ratio), rtol=2.4e-7, atol=1e-7)
        clipped += int((ratio.abs() >= 1).sum())
        newton += int(((ratio.abs() < 1) & (g != 0)).sum())
    assert clipped > 1000 and newton > 1000  # both kinds of step: the clipping engages, and not everywhere
    line = json.loads((tmp_path / "out" / "trajectory.jsonl").read_text().splitlines()[0])
    total = sum(p.numel() for p in params)
    assert line["sophia_clipped"] == pytest.approx(clipped / total, abs=1e-5)
    run = read_json(tmp_path / "out" / "run.json")
    assert run["settings"]["optimizer"] == "sophia" and run["settings"]["sophia_gamma"] == gamma
    # the forget batch twice (the step's backward and the estimate's), the retain batch once (as the loop counts it)
    assert run["tokens"]["backward"] == 2 * int(batch.mask.sum()) + int(retain.mask.sum())


class Cubic:
    """A forget objective with a Hessian known by hand: l(a, b) = sum_i a_i^3 + 2 a_0 b_1 + b . b."""

    averages_over = SEQUENCES

    def loss(self, ctx: Context, forget: Batch, retain: Batch | None) -> torch.Tensor:
        a, b = ctx.model.a, ctx.model.b
        return (a**3).sum() + 2 * a[0] * b[1] + (b * b).sum()


def test_hutchinson_is_u_times_the_hessian_times_u():
    module = torch.nn.Module()
    module.a = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))
    module.b = torch.nn.Parameter(torch.tensor([1.5, -0.5]))
    params = [module.a, module.b]
    ctx = Context(model=module, runtime=RUNTIME, pad_id=0, forget_ids=[])
    forget = Batch([0], torch.zeros((1, 2), dtype=torch.long), torch.ones((1, 2), dtype=torch.long))
    estimate = hutchinson_estimate(ctx, Cubic(), forget, None, params, True, 7, Accelerator(cpu=True))

    # by hand: H over (a0, a1, a2, b0, b1); u the +-1 draws of the step's generator, one tensor per parameter
    hessian = torch.diag(torch.tensor([6 * 0.5, 6 * -1.0, 6 * 2.0, 2.0, 2.0]))
    hessian[0, 4] = hessian[4, 0] = 2.0
    generator = torch.Generator().manual_seed(7)
    u = torch.cat([torch.randint(0, 2, p.shape, generator=generator, dtype=torch.int8).float() * 2 - 1
                   for p in params])
    expected = u * (hessian @ u)
    torch.testing.assert_close(torch.cat(estimate), expected)
    assert not torch.equal(expected, torch.diag(hessian))  # the cross term a0 b1 shows: one draw is not diag(H)


def test_a_sophia_run_reaches_its_target(tiny, general, tmp_path):
    """hinge (the default method) to `indistinguishable`, with the settings read as the CLI reads them: the YAML,
    then the flags, which win."""
    config = tmp_path / "config.yaml"
    config.write_text("optimizer: sophia\nsophia_gamma: 0.5\nlr: 1.0e-3\n")
    settings = unlearn_settings(config, {"sophia_gamma": 0.04, "max_steps": 40, "max_utility_drop": 10.0,
                                         "el_n": "0", "prefix_tokens": 8, "batch_size": 8})
    assert (settings.method, settings.optimizer, settings.sophia_gamma) == ("hinge", "sophia", 0.04)
    out = tmp_path / "run"
    result = unlearn(str(tiny["model"]), tiny_sets(tiny), general, settings, RUNTIME, out)
    run = read_json(out / "run.json")
    assert result.target_reached and run["target"] == "indistinguishable" and run["target_reached"]
    assert run["settings"]["optimizer"] == "sophia" and run["settings"]["sophia_gamma"] == 0.04
    assert run["forget"]["extractable_after"] == 0 < run["forget"]["extractable_before"]
    lines = [json.loads(line) for line in (out / "trajectory.jsonl").read_text().splitlines()]
    assert len(lines) == run["steps"] + 1 and run["steps"] > 0
    assert all(0 < line["sophia_clipped"] <= 1 for line in lines[:-1])


def test_a_sophia_run_resumes_to_the_same_result(tiny, general, tmp_path, monkeypatch):
    """Hutchinson every 2 steps, killed after the checkpoint of step 2: the resumed run refreshes h at step 2 from
    the restored state with the same draws and ends where the uninterrupted run ends, bit for bit."""
    settings = UnlearnSettings(method="gd", lr=3e-4, optimizer="sophia", sophia_hessian="hutchinson", sophia_every=2,
                               stop="steps", max_steps=4, checkpoint_every=2, max_utility_drop=10.0, target="ma",
                               audit=FAST_AUDIT)
    sets = tiny_sets(tiny)

    def saved_at_step_2(checkpoint):
        saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
        assert all(set(s) == {"step", "exp_avg", "hessian"} and float(s["step"]) == 2 for s in saved["state"].values())

    assert_resumes_bit_for_bit(tiny["model"], sets, general, settings, RUNTIME, tmp_path, monkeypatch,
                               between=saved_at_step_2)


@pytest.mark.parametrize("options", [{"mask_fraction": 0.05}, {"lora": 4}])
def test_sophia_trains_only_what_is_trained(tiny, general, tmp_path, options):
    """--mask-fraction: the frozen weights have m = 0, so they do not move; --lora: only the adapters train (and
    are merged on save), so the change of a weight matrix has the adapter's rank at most."""
    settings = UnlearnSettings(method="ga", lr=3e-4, optimizer="sophia", stop="steps", max_steps=3,
                               max_utility_drop=10.0, target="ma", audit=FAST_AUDIT, **options)
    result = unlearn(str(tiny["model"]), tiny_sets(tiny), general, settings, RUNTIME, tmp_path / "out")
    original, _ = load_model(tiny["model"], RUNTIME)
    unlearned, _ = load_model(tmp_path / "out" / "model", RUNTIME)
    pairs = list(zip(original.named_parameters(), unlearned.parameters(), strict=True))
    changed = sum(int((a != b).sum()) for (_, a), b in pairs)
    assert result.run["steps"] == 3 and changed > 0
    if "mask_fraction" in options:
        assert changed <= 0.05 * sum(p.numel() for p in original.parameters()) + 1
    else:
        for (name, a), b in pairs:
            if a.ndim == 2 and "proj" in name:
                assert torch.linalg.matrix_rank(b - a, atol=1e-6) <= 4, name
            elif "norm" in name:
                assert torch.equal(a, b), name


def test_a_bad_optimizer_exits_2_with_one_line(tiny, tmp_path):
    out = tmp_path / "out"
    result = run_cli("unlearn", "--model", tiny["model"], "--forget", tiny["files"]["forget"], "--holdout",
                     tiny["files"]["holdout"], "--optimizer", "sgd", "--out", out, *FAST, env=ONE_THREAD)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--optimizer: Input should be 'adam' or 'sophia'" in lines[0], result.stderr
    assert not out.exists() and not out.with_name("out.partial").exists()


@pytest.mark.parametrize(("yaml", "message"),
                         [("sophia_every: 0\n", "--sophia-every: Input should be greater than or equal to 1"),
                          ("sophia_gamma: -1\n", "--sophia-gamma: Input should be greater than 0"),
                          ("sophia_hessian: exact\n", "--sophia-hessian: Input should be 'gnb' or 'hutchinson'")])
def test_bad_sophia_settings_in_the_yaml_are_one_line_errors(tmp_path, yaml, message):
    config = tmp_path / "config.yaml"
    config.write_text("optimizer: sophia\n" + yaml)
    with pytest.raises(InputError, match=f"^--config {config}: {message}"):
        unlearn_settings(config, {})
    settings = unlearn_settings(None, {"optimizer": "sophia"})
    assert (settings.sophia_gamma, settings.sophia_hessian, settings.sophia_every) == (0.04, "gnb", 1)
    assert UnlearnSettings().optimizer == "adam"  # Adam unless asked


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to this Python")
def test_two_processes_match_one_under_sophia(tiny, tmp_path):
    """DDP: each process estimates hhat on its shard with the same draws per sequence, the pieces are summed across
    processes, so h, and with it every step, is the one-process run's."""
    options = ["--method", "ga", "--optimizer", "sophia", "--sophia-gamma", "20", "--lr", "1e-3", "--stop", "steps",
               "--max-steps", "3", "--max-utility-drop", "10", "--general", str(tiny["files"]["retain"]), *FAST]

    def arguments(out):
        return ["unlearn", "--model", str(tiny["model"]), "--forget", str(tiny["files"]["forget"]), "--holdout",
                str(tiny["files"]["holdout"]), "--retain", str(tiny["files"]["retain"]), *options, "--out", str(out)]

    one_and_two_processes(arguments, tmp_path, steps=3, keys=("loss", "sophia_clipped"))
