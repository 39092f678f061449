"""The method registry: each forget loss against a hand computation, options (--method-arg), `methods --json`,
and the task vector under --stop steps."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from clirun import run_cli
from tiny import build_method as build
from tiny import perturb

from unmemorize.cli import method_args_for, parse_method_args, unlearn_settings
from unmemorize.errors import InputError
from unmemorize.io.models import make_runtime
from unmemorize.io.sets import Sequence
from unmemorize.io.tokens import encode, pad_id_of
from unmemorize.runs.config import UnlearnSettings
from unmemorize.runs.run import unlearn
from unmemorize.unlearning.context import Batch, Context
from unmemorize.unlearning.methods import METHODS

RUNTIME = make_runtime("cpu", "float32")


def hand_logprobs(model, ids: list[int]) -> list[float]:
    """log p(ids[t] | ids[:t]) for t = 1..T-1, one sequence at a time (no padding), token by token."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    return [float(torch.log_softmax(logits[t - 1], -1)[ids[t]]) for t in range(1, len(ids))]


def hand_hidden(model, ids: list[int], layer: int) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[layer + 1][0].float()


@pytest.fixture(scope="module")
def setup(tiny, tiny_loaded):
    """A private copy of the tiny model and two forget (and two retain) sequences of different lengths."""
    model, tokenizer, _ = tiny_loaded
    model = copy.deepcopy(model)
    forget = encode(tokenizer, tiny["sets"]["forget"], 256)
    retain = encode(tokenizer, tiny["sets"]["retain"], 256)
    first = forget[0]
    second = next(ids for ids in forget if len(ids) != len(first))
    retain_pair = [retain[0], next(ids for ids in retain if len(ids) != len(retain[0]))]
    return model, tokenizer, [first, second], retain_pair


def context(model, tokenizer, forget: list[list[int]]) -> tuple[Context, Batch]:
    ctx = Context(model=model, runtime=RUNTIME, pad_id=pad_id_of(tokenizer), forget_ids=forget)
    return ctx, Batch.of(forget, [0, 1], ctx.pad_id, RUNTIME.device)


def test_ascent_loss_is_the_mean_log_probability_of_the_predicted_tokens(setup):
    model, tokenizer, forget, _ = setup
    ctx, batch = context(model, tokenizer, forget)
    objective = build("ga", tokenizer)
    objective.prepare(ctx)
    loss = float(objective.loss(ctx, batch, None).detach())
    logprobs = [lp for ids in forget for lp in hand_logprobs(model, ids)]
    assert len(logprobs) == len(forget[0]) + len(forget[1]) - 2
    assert loss == pytest.approx(sum(logprobs) / len(logprobs), rel=1e-5)
    assert batch.units(objective.averages_over) == len(logprobs)  # a mean over predicted tokens


def test_npo_loss_with_a_non_default_beta(setup):
    model, tokenizer, forget, _ = setup
    original = model
    model = copy.deepcopy(original)
    ctx, batch = context(model, tokenizer, forget)
    beta = 0.5
    objective = build("npo", tokenizer, beta=beta)
    assert objective.config.beta == beta
    objective.prepare(ctx)  # log pi_ref: the model as it is before training
    perturb(model)  # training has moved the model: log pi differs from log pi_ref
    loss = float(objective.loss(ctx, batch, None).detach())
    terms = []
    for ids in forget:
        ratio = sum(hand_logprobs(model, ids)) - sum(hand_logprobs(original, ids))
        assert abs(ratio) > 0.1
        terms.append(math.log(1 / (1 + math.exp(beta * ratio))))  # log sigmoid(-beta * ratio)
    assert loss == pytest.approx(-(2 / beta) * sum(terms) / len(terms), rel=1e-4)
    assert batch.units(objective.averages_over) == 2  # a mean over sequences


def test_method_arg_beta_changes_the_npo_loss(setup):
    model, tokenizer, forget, _ = setup
    model = copy.deepcopy(model)
    ctx, batch = context(model, tokenizer, forget)
    # as the command line reads `--method npo --method-arg beta=0.5`
    settings = unlearn_settings(None, {"method": "npo", "method_args": parse_method_args(["beta=0.5"])})
    assert settings.method_args == {"beta": 0.5}
    changed = settings.spec.build(settings.method_args, tokenizer)[0]
    default = build("npo", tokenizer)
    assert default.config.beta == 0.1 and changed.config.beta == 0.5
    changed.prepare(ctx)
    default.prepare(ctx)
    perturb(model)
    changed_loss = float(changed.loss(ctx, batch, None).detach())
    assert changed_loss != pytest.approx(float(default.loss(ctx, batch, None).detach()), rel=1e-3)


def test_rmu_loss_is_steering_plus_alpha_times_retain_drift(setup):
    model, tokenizer, forget, retain = setup
    model = copy.deepcopy(model)
    ctx, batch = context(model, tokenizer, forget)
    retain_batch = Batch.of(retain, [0, 1], ctx.pad_id, RUNTIME.device)
    alpha, coeff = 3.0, 5.0
    objective = build("rmu", tokenizer, alpha=alpha, steering_coeff=coeff)
    objective.prepare(ctx)  # keeps the original model
    original = copy.deepcopy(model)
    perturb(model)
    loss = float(objective.loss(ctx, batch, retain_batch).detach())

    layer = model.config.num_hidden_layers // 2  # layer=-1: the middle layer
    width = model.config.hidden_size
    direction = torch.rand(width, generator=torch.Generator().manual_seed(0))  # the default seed
    target = coeff * direction / direction.norm()
    steering, tokens = 0.0, 0
    for ids in forget:
        hidden = hand_hidden(model, ids, layer)
        for t in range(len(ids)):  # every real token, the first included
            steering += float(((hidden[t] - target) ** 2).sum())
            tokens += 1
    drift, retain_tokens = 0.0, 0
    for ids in retain:
        now, was = hand_hidden(model, ids, layer), hand_hidden(original, ids, layer)
        for t in range(len(ids)):
            drift += float(((now[t] - was[t]) ** 2).sum())
            retain_tokens += 1
    assert drift > 0
    expected = steering / (tokens * width) + alpha * drift / (retain_tokens * width)
    assert loss == pytest.approx(expected, rel=1e-4)
    assert batch.units(objective.averages_over) == tokens  # a mean over every real token
    # the default alpha weighs the same drift differently
    default = build("rmu", tokenizer, steering_coeff=coeff)
    default.prepare(Context(model=original, runtime=RUNTIME, pad_id=ctx.pad_id, forget_ids=forget))
    default_loss = float(default.loss(ctx, batch, retain_batch).detach())
    assert default_loss == pytest.approx(expected + (10.0 - alpha) * drift / (retain_tokens * width), rel=1e-4)


def test_idk_loss_counts_only_the_refusal_tokens(setup):
    model, tokenizer, forget, _ = setup
    ctx, batch = context(model, tokenizer, forget)
    words = ["k0", "v1", "v2", "v3"]
    objective = build("idk", tokenizer, refusal=" " + " ".join(words), prefix_tokens=3)
    objective.prepare(ctx)
    loss = float(objective.loss(ctx, batch, None).detach())
    refusal = tokenizer.convert_tokens_to_ids(words)
    total, count = 0.0, 0
    for ids in forget:
        prefix = min(3, len(ids) // 2)
        example = [*ids[:prefix], *refusal]
        logprobs = hand_logprobs(model, example)  # logprobs[t - 1] scores example[t]
        for t in range(prefix, len(example)):
            total += logprobs[t - 1]
            count += 1
    assert count == 2 * len(words)
    assert loss == pytest.approx(-total / count, rel=1e-5)
    assert batch.units(objective.averages_over) == 2  # a mean over sequences (the refusal has one length)


def test_methods_json_lists_every_method_and_option():
    result = run_cli("methods", "--json")
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    assert list(listed) == list(METHODS)
    for name, spec in METHODS.items():
        assert set(listed[name]) == {"summary", "options", "lr", "retain_loss", "selection", "margin", "localize"}
        assert listed[name]["summary"] == spec.summary
        assert (listed[name]["lr"], listed[name]["localize"]) == (spec.lr, spec.localize)
        assert set(listed[name]["options"]) == set(spec.config.model_fields)
        for key, option in listed[name]["options"].items():
            assert set(option) == {"default", "help"} and option["help"]
            assert option["default"] == spec.config.model_fields[key].default
    assert listed["npo"]["options"]["beta"]["default"] == 0.1
    assert set(listed["rmu"]["options"]) == {"layer", "steering_coeff", "alpha", "trainable_layers", "seed"}
    assert set(listed["idk"]["options"]) == {"refusal", "prefix_tokens"}
    assert "tolerance" in listed["sgatau"]["options"] and listed["ga"]["options"] == {}
    assert listed["hinge"]["localize"] == "causal:6" and listed["ga"]["localize"] == "none"


@pytest.mark.parametrize(("extra", "message"), [
    (["unlearn", "--method", "npo", "--method-arg", "beta=-1"], "--method-arg beta=-1: npo's beta must be > 0"),
    (["unlearn", "--method", "rmu", "--method-arg", "gamma=2"], "rmu has no option 'gamma'"),
    (["unlearn", "--method", "rmu", "--method-arg", "layer=middle"], "rmu's layer must be an integer"),
    (["unlearn", "--method", "idk", "--config", "{config}"], "idk's prefix_tokens must be >= 1"),
    (["compare", "--methods", "ga,npo", "--method-arg", "alpha=1"], "none of the compared methods (ga, npo)"),
    (["compare", "--methods", "ga,npo", "--method-arg", "npo.beta=0"], "npo's beta must be > 0"),
])
def test_bad_method_args_exit_2_before_any_model_loads(tmp_path, extra, message):
    config = tmp_path / "config.yaml"
    config.write_text("method_args:\n  prefix_tokens: 0\n")
    missing = tmp_path / "no-such-model"
    args = [e.format(config=config) for e in extra]
    result = run_cli(*args, "--model", missing, "--forget", tmp_path / "no-forget.jsonl", "--holdout",
                     tmp_path / "no-holdout.jsonl", "--out", tmp_path / "out")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_a_good_method_arg_gets_past_the_settings_to_the_inputs(tmp_path):
    """The control of the test above: with a valid option the same command fails on its missing files."""
    result = run_cli("unlearn", "--method", "npo", "--method-arg", "beta=0.5", "--model", tmp_path / "no-such-model",
                     "--forget", tmp_path / "no-forget.jsonl", "--holdout", tmp_path / "h.jsonl", "--out",
                     tmp_path / "out")
    assert result.returncode == 2 and "method-arg" not in result.stderr and "no-forget" in result.stderr


def test_method_args_values_and_their_scope():
    assert parse_method_args(["beta=0.5", "refusal=I can't", "layer=3", "refusal2=a: b"]) == \
        {"beta": 0.5, "refusal": "I can't", "layer": 3, "refusal2": "a: b"}
    with pytest.raises(InputError, match="expected KEY=VALUE"):
        parse_method_args(["beta"])
    # compare: a plain key goes to every compared method that has it, METHOD.KEY to that method only
    args = {"beta": 0.5, "rmu.alpha": 2.0}
    assert method_args_for("npo", args, ["npo", "ga", "rmu"]) == {"beta": 0.5}
    assert method_args_for("ga", args, ["npo", "ga", "rmu"]) == {}
    assert method_args_for("rmu", args, ["npo", "ga", "rmu"]) == {"alpha": 2.0}
    with pytest.raises(InputError, match="'rmu' is not in --method npo"):
        method_args_for("npo", args)
    settings = UnlearnSettings(method="sgatau", method_args={"tolerance": "0.05"})
    assert settings.method_args == {"tolerance": 0.05}
    assert settings.model_dump(mode="json")["method_args"] == {"tolerance": 0.05}
    assert [stage.config.tolerance for stage in settings.spec.build(settings.method_args, None)[1:]] == [0.05]


def test_stop_steps_task_vector_subtracts_max_lambda(tiny, tmp_path):
    from tiny import sentences

    general = [Sequence(f"g{i}", text) for i, text in enumerate(sentences(10, seed=99))]
    settings = UnlearnSettings(method="ta", stop="steps", lr=3e-3, max_lambda=0.75, tv_epochs=1,
                               max_utility_drop=10.0, audit={"el_n": [], "prefix_tokens": 8, "batch_size": 8},
                               evaluation={"health": False})
    sets = {k: v for k, v in tiny["sets"].items() if k in ("forget", "holdout", "retain")}
    result = unlearn(str(tiny["model"]), sets, general, settings, RUNTIME, tmp_path / "out")
    assert result.run["lambda"] == 0.75
    assert "--stop steps" in result.run["stop_reason"] and result.run["steps"] == 0
    assert result.after.summary("forget")["mean_ma"] < result.before.summary("forget")["mean_ma"]
