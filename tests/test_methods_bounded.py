"""The bounded forget objectives of issue 12 (simnpo, undial, wga, satimp, ce_u): each loss against a hand
computation on a two-sequence batch of the tiny model, each option changing the loss, `methods --json`, and a
few real steps of each raising the forget loss."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from clirun import run_cli
from tiny import build_method as build
from tiny import perturb

from unmemorize.cli import parse_method_args, unlearn_settings
from unmemorize.errors import InputError
from unmemorize.io.models import make_runtime
from unmemorize.io.sets import Sequence
from unmemorize.io.tokens import encode, pad_id_of
from unmemorize.runs.config import UnlearnSettings
from unmemorize.runs.run import unlearn
from unmemorize.unlearning.context import PREDICTED_TOKENS, SEQUENCES, Batch, Context
from unmemorize.unlearning.methods import ALL, BAND, METHODS

RUNTIME = make_runtime("cpu", "float32")
NEW = ["simnpo", "undial", "wga", "satimp", "ce_u"]


def hand_logits(model, ids: list[int]) -> torch.Tensor:
    """Logits of one unpadded sequence in float64: row t-1 is the distribution over ids[t]."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].double()


def hand_logprobs(model, ids: list[int]) -> list[float]:
    """log p(ids[t] | ids[:t]) for t = 1..T-1, token by token."""
    logits = hand_logits(model, ids)
    return [float(torch.log_softmax(logits[t - 1], -1)[ids[t]]) for t in range(1, len(ids))]


@pytest.fixture(scope="module")
def setup(tiny, tiny_loaded):
    """A private copy of the tiny model and two forget sequences of different lengths (the batch pads one)."""
    model, tokenizer, _ = tiny_loaded
    model = copy.deepcopy(model)
    forget = encode(tokenizer, tiny["sets"]["forget"], 256)
    first = forget[0]
    second = next(ids for ids in forget if len(ids) != len(first))
    return model, tokenizer, [first, second]


def context(model, tokenizer, forget: list[list[int]]) -> tuple[Context, Batch]:
    ctx = Context(model=model, runtime=RUNTIME, pad_id=pad_id_of(tokenizer), forget_ids=forget)
    return ctx, Batch.of(forget, [0, 1], ctx.pad_id, RUNTIME.device)


def value(objective, ctx: Context, batch: Batch) -> float:
    return float(objective.loss(ctx, batch, None).detach())


def moved(setup, scale: float = 0.05):
    """(model, ctx, batch) on a copy of the tiny model moved away from its memorizing optimum, so token
    probabilities are spread out (not all near 1)."""
    model, tokenizer, forget = setup
    model = copy.deepcopy(model)
    perturb(model, scale=scale)
    ctx, batch = context(model, tokenizer, forget)
    return model, ctx, batch


# --- each loss against a hand computation ------------------------------------------------------------------


@pytest.mark.parametrize("options", [{}, {"beta": 1.5, "gamma": 0.3}])
def test_simnpo_loss_is_the_length_normalized_npo_without_reference(setup, options):
    model, ctx, batch = moved(setup)
    tokenizer, forget = setup[1], setup[2]
    objective = build("simnpo", tokenizer, **options)
    beta, gamma = options.get("beta", 2.5), options.get("gamma", 0.0)
    assert (objective.config.beta, objective.config.gamma) == (beta, gamma)
    objective.prepare(ctx)
    loss = value(objective, ctx, batch)

    def expected(length_of) -> float:
        terms = []
        for ids in forget:
            logprob = sum(hand_logprobs(model, ids))
            z = -(beta / length_of(ids)) * logprob - gamma
            terms.append(-math.log1p(math.exp(-z)))  # log sigmoid(z)
        return -(2 / beta) * sum(terms) / len(terms)

    assert loss == pytest.approx(expected(lambda ids: len(ids) - 1), rel=1e-5)  # |y_i|: predicted tokens
    assert loss != pytest.approx(expected(len), rel=1e-3)  # normalising by the tokens instead would show
    assert loss > 0  # -log sigmoid(.) > 0: bounded below by 0
    assert batch.units(objective.averages_over) == 2 and objective.averages_over == SEQUENCES


@pytest.mark.parametrize("strength", [10.0, 3.0])
def test_undial_loss_is_cross_entropy_to_the_adjusted_original(setup, strength):
    model, tokenizer, forget = setup
    model = copy.deepcopy(model)
    ctx, batch = context(model, tokenizer, forget)
    objective = build("undial", tokenizer, **({} if strength == 10.0 else {"strength": strength}))
    assert objective.config.strength == strength
    objective.prepare(ctx)  # keeps the original: the teacher
    original = copy.deepcopy(model)
    perturb(model)  # training has moved the model away from its teacher
    loss = value(objective, ctx, batch)

    def expected(teacher_model) -> float:
        total, count = 0.0, 0
        for ids in forget:
            now, was = hand_logits(model, ids), hand_logits(teacher_model, ids)
            for t in range(1, len(ids)):
                adjusted = was[t - 1].clone()
                adjusted[ids[t]] -= strength
                target = torch.softmax(adjusted, -1)
                total += float(-(target * torch.log_softmax(now[t - 1], -1)).sum())
                count += 1
        return total / count

    assert loss == pytest.approx(expected(original), rel=1e-5)
    assert loss != pytest.approx(expected(model), rel=1e-3)  # the teacher is the original, not the model now
    assert batch.units(objective.averages_over) == len(forget[0]) + len(forget[1]) - 2


@pytest.mark.parametrize("beta", [1.0, 2.5])
def test_wga_loss_is_ascent_weighted_by_p_to_the_beta(setup, beta):
    model, ctx, batch = moved(setup)
    tokenizer, forget = setup[1], setup[2]
    objective = build("wga", tokenizer, **({} if beta == 1.0 else {"beta": beta}))
    assert objective.config.beta == beta
    loss = value(objective, ctx, batch)
    logprobs = [lp for ids in forget for lp in hand_logprobs(model, ids)]
    terms = [math.exp(lp) ** beta * lp for lp in logprobs]
    assert loss == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    assert loss < 0  # minimizing it lowers log p: the sign of ascent
    assert batch.units(objective.averages_over) == len(logprobs) and objective.averages_over == PREDICTED_TOKENS


@pytest.mark.parametrize(("beta1", "beta2"), [(5.0, 1.0), (2.0, 3.0)])
def test_satimp_loss_is_ascent_weighted_by_saturation_and_importance(setup, beta1, beta2):
    model, ctx, batch = moved(setup)
    tokenizer, forget = setup[1], setup[2]
    args = {} if (beta1, beta2) == (5.0, 1.0) else {"beta1": beta1, "beta2": beta2}
    objective = build("satimp", tokenizer, **args)
    assert (objective.config.beta1, objective.config.beta2) == (beta1, beta2)
    loss = value(objective, ctx, batch)
    logprobs = [lp for ids in forget for lp in hand_logprobs(model, ids)]
    terms = [math.exp(lp) ** beta1 * (1 - math.exp(lp)) ** beta2 * lp for lp in logprobs]
    assert loss == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    assert loss < 0
    assert batch.units(objective.averages_over) == len(logprobs)


def test_ce_u_loss_is_cross_entropy_to_the_prediction_without_the_true_token(setup):
    model, ctx, batch = moved(setup)
    tokenizer, forget = setup[1], setup[2]
    objective = build("ce_u", tokenizer)
    loss = value(objective, ctx, batch)
    total, closed_form, count = 0.0, 0.0, 0
    for ids in forget:
        logits = hand_logits(model, ids)
        for t in range(1, len(ids)):
            p = torch.softmax(logits[t - 1], -1)
            q = p.clone()
            q[ids[t]] = 0.0
            q = q / q.sum()  # the model's own distribution over every token but the true one
            total += float(-(q * torch.log(p)).sum())
            nonzero = q[q > 0]
            closed_form += float(-(nonzero * nonzero.log()).sum() - torch.log1p(-p[ids[t]]))  # H(q) - log(1 - p_y)
            count += 1
    assert loss == pytest.approx(total / count, rel=1e-5)
    assert loss == pytest.approx(closed_form / count, rel=1e-5)
    assert batch.units(objective.averages_over) == count


def test_ce_u_gradient_lowers_the_true_tokens_probability(setup):
    """The target is detached: the gradient is that of -log(1 - p_y), which pushes p_y down."""
    model, ctx, batch = moved(setup)
    objective = build("ce_u", setup[1])
    model.zero_grad()
    objective.loss(ctx, batch, None).backward()
    before = float(ctx.sequence_logprobs(batch).sum().detach())
    with torch.no_grad():
        for param in model.parameters():
            if param.grad is not None:
                param.sub_(1e-3 * param.grad)
    assert float(ctx.sequence_logprobs(batch).sum().detach()) < before


# --- options -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "arg"), [("simnpo", "beta=1.0"), ("simnpo", "gamma=0.5"),
                                             ("undial", "strength=3"), ("wga", "beta=2"),
                                             ("satimp", "beta1=2"), ("satimp", "beta2=3")])
def test_each_method_arg_changes_the_loss(setup, method, arg):
    _, ctx, batch = moved(setup)
    tokenizer = setup[1]
    # as the command line reads `--method METHOD --method-arg KEY=VALUE`
    settings = unlearn_settings(None, {"method": method, "method_args": parse_method_args([arg])})
    key, raw = arg.split("=")
    assert settings.method_args == {key: float(raw)}
    changed = settings.spec.build(settings.method_args, tokenizer)[0]
    default = build(method, tokenizer)
    assert getattr(changed.config, key) == float(raw) != getattr(default.config, key)
    changed.prepare(ctx)
    default.prepare(ctx)
    assert value(changed, ctx, batch) != pytest.approx(value(default, ctx, batch), rel=1e-3)


@pytest.mark.parametrize(("method", "args", "message"), [
    ("simnpo", {"beta": 0}, "simnpo's beta must be > 0"),
    ("simnpo", {"gamma": -1}, "simnpo's gamma must be >= 0"),
    ("undial", {"strength": 0}, "undial's strength must be > 0"),
    ("wga", {"beta": -0.5}, "wga's beta must be >= 0"),
    ("satimp", {"beta2": "x"}, "satimp's beta2 must be a number"),
    ("ce_u", {"beta": 1}, "ce_u has no option 'beta'"),
])
def test_bad_options_are_refused(method, args, message):
    with pytest.raises(InputError, match=message):
        METHODS[method].validate(args)


def test_the_registry_names_and_their_defaults():
    for name in NEW:
        assert METHODS[name].selection == ALL and METHODS[name].retain_loss == "none"
        assert METHODS[name].lr == 2e-5
    assert METHODS["ssimnpo"].selection == BAND and METHODS["ssimnpo"].stages == METHODS["simnpo"].stages
    for name in ("simnpo_gd", "wga_gd", "satimp_gd"):
        assert METHODS[name].retain_loss == "nll" and METHODS[name].stages == METHODS[name[:-3]].stages


def test_methods_json_lists_the_new_methods_and_options():
    result = run_cli("methods", "--json")
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    expected = {"simnpo": {"beta": 2.5, "gamma": 0.0}, "ssimnpo": {"beta": 2.5, "gamma": 0.0},
                "simnpo_gd": {"beta": 2.5, "gamma": 0.0}, "undial": {"strength": 10.0}, "wga": {"beta": 1.0},
                "wga_gd": {"beta": 1.0}, "satimp": {"beta1": 5.0, "beta2": 1.0},
                "satimp_gd": {"beta1": 5.0, "beta2": 1.0}, "ce_u": {}}
    for name, options in expected.items():
        assert listed[name]["summary"] == METHODS[name].summary
        assert {key: option["default"] for key, option in listed[name]["options"].items()} == options
        assert all(option["help"] for option in listed[name]["options"].values())


# --- a few real steps --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", NEW)
def test_a_few_steps_raise_the_forget_loss(tiny, tmp_path, method):
    settings = UnlearnSettings(method=method, stop="steps", max_steps=3, lr=1e-3, max_utility_drop=10.0,
                               audit={"el_n": [], "prefix_tokens": 8, "batch_size": 8},
                               evaluation={"health": False})
    from tiny import sentences

    general = [Sequence(f"g{i}", text) for i, text in enumerate(sentences(10, seed=99))]
    sets = {k: v for k, v in tiny["sets"].items() if k in ("forget", "holdout", "retain")}
    result = unlearn(str(tiny["model"]), sets, general, settings, RUNTIME, tmp_path / "out")
    assert result.run["steps"] == 3
    before, after = result.before.summary("forget"), result.after.summary("forget")
    assert after["mean_loss"] > before["mean_loss"] + 0.3, (before, after)
