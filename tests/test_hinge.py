"""The two-way hinge (method `hinge`): its loss against a hand computation, one step in each direction, the
`two_way` selection, `--neighbours` (KL on unseen in-domain text; never the holdout) and a short run."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from clirun import run_cli
from conftest import read_json
from test_methods import hand_logprobs

from unmemorize.io.models import make_runtime
from unmemorize.io.sets import Sequence, write_jsonl
from unmemorize.io.tokens import encode, pad_id_of
from unmemorize.measure.band import Band, LossBand, calibrate_loss
from unmemorize.measure.scoring import minkpp_z
from unmemorize.runs.config import UnlearnSettings
from unmemorize.runs.run import unlearn
from unmemorize.unlearning.context import Batch, Context, StepState
from unmemorize.unlearning.methods import METHODS, TWO_WAY
from unmemorize.unlearning.methods.hinge import band_hinge, flip_hinge, true_margins
from unmemorize.unlearning.target import selected

RUNTIME = make_runtime("cpu", "float32")
FLOAT32 = ["--device", "cpu", "--dtype", "float32"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
FAST = ["--el-n", "0", "--prefix-tokens", "8", *FLOAT32]


def hinge(tokenizer, **args):
    """The method with `args`; without the z floor unless asked (the hand computations here are of the loss and MA
    terms; the z floor has its own)."""
    args.setdefault("z_floor", None)
    settings = UnlearnSettings(method="hinge", method_args=args)
    return settings.spec.build(settings.method_args, tokenizer)[0]


def mean_nll(model, ids: list[int]) -> float:
    logprobs = hand_logprobs(model, ids)
    return -sum(logprobs) / len(logprobs)


def logit_rows(model, ids: list[int]) -> list[tuple[list[float], int]]:
    """(the logits of position t - 1 as plain floats, x_t) for t = 2..T."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    return [(logits[t - 1].tolist(), ids[t]) for t in range(1, len(ids))]


def hand_margins(model, ids: list[int]) -> list[float]:
    """z_t[x_t] - max_{v != x_t} z_t[v] for t = 2..T, one token at a time."""
    return [row[x] - max(v for k, v in enumerate(row) if k != x) for row, x in logit_rows(model, ids)]


@pytest.fixture
def pair(tiny, tiny_loaded):
    """A private copy of the tiny model and two forget sequences: a memorized one (f0, low loss) and one seen once
    (f5, higher loss), with their mean token NLL computed by hand."""
    model, tokenizer, _ = tiny_loaded
    model = copy.deepcopy(model)
    forget = encode(tokenizer, tiny["sets"]["forget"], 256)
    pair = [forget[0], forget[5]]
    losses = [mean_nll(model, ids) for ids in pair]
    assert losses[1] > losses[0] + 0.1
    return model, tokenizer, pair, losses


WIDE = Band("quantile:0.05,0.95", 0.0, 1.0, 20)  # an MA band nothing is above: only the loss term acts


def step_context(model, tokenizer, forget, lo, hi, rows=(0, 1), band=WIDE, prefix=8) -> tuple[Context, Batch]:
    ctx = Context(model=model, runtime=RUNTIME, pad_id=pad_id_of(tokenizer), forget_ids=forget)
    ctx.step = StepState(band, LossBand("quantile:0.05,0.95", lo, hi, 20), prefix)
    return ctx, Batch.of(forget, list(rows), ctx.pad_id, RUNTIME.device)


def test_band_hinge_is_the_distance_to_the_holdout_median_outside_the_band_or_while_flipping():
    loss = torch.tensor([1.0, 2.5, 4.2, 2.1, 3.9])
    band = LossBand("quantile:0.05,0.95", 2.0, 4.0, 20, median=2.8)
    # band [2, 4], holdout median 2.8: under it 2.8 - 1; inside 0; over it 4.2 - 2.8
    assert band_hinge(loss, band).tolist() == pytest.approx([1.8, 0.0, 1.4, 0.0, 0.0], abs=1e-6)
    # a sequence whose MA term flips tokens has its loss held at the median even inside the band
    moving = torch.tensor([False, True, False, False, False])
    assert band_hinge(loss, band, moving).tolist() == pytest.approx([1.8, 0.3, 1.4, 0.0, 0.0], abs=1e-6)
    # without a median (a band built by hand): the middle, 3
    assert band_hinge(loss, LossBand("quantile:0.05,0.95", 2.0, 4.0, 20)).tolist() == pytest.approx(
        [2.0, 0.0, 1.2, 0.0, 0.0], abs=1e-6)
    # the band moved in by the margin (the loop's aim, 0.1 of its width: [2.2, 3.8]; the median stays): 2.1 and
    # 3.9 are outside
    aim = band.inset(0.1)
    assert (aim.lower, aim.upper, aim.median) == pytest.approx((2.2, 3.8, 2.8))
    assert band_hinge(loss, aim).tolist() == pytest.approx([1.8, 0.0, 1.4, 0.7, 1.1], abs=1e-6)
    # the mean rule (no upper edge): relu(lower - loss); a margin leaves a one-edged band as it is
    assert band_hinge(loss, LossBand("mean", 2.2, None, 20)).tolist() == pytest.approx(
        [1.2, 0.0, 0.0, 0.1, 0.0], abs=1e-6)
    assert LossBand("mean", 2.2, None, 20).inset(0.25) == LossBand("mean", 2.2, None, 20)


def test_the_loss_band_median_is_the_holdouts():
    assert calibrate_loss("quantile:0.05,0.95", [1.0, 5.0, 2.0, 3.0]).median == pytest.approx(2.5)


def test_flip_hinge_flips_the_fewest_cheapest_right_tokens():
    margins = torch.tensor([3.0, 0.5, -1.0, 2.0, 0.2], requires_grad=True)
    # MA 4/5 = 0.8 > 0.6: ceil(4 - 5 * 0.6) = 1 flip, the right token with the smallest margin (0.2)
    value = flip_hinge(margins, 0.6, 1.0, prefix=1)
    assert float(value.detach()) == pytest.approx(1.2)
    value.backward()
    assert margins.grad.tolist() == [0.0, 0.0, 0.0, 0.0, 1.0]  # gradient on the chosen token only
    # upper edge 0.4: ceil(4 - 2) = 2 flips, 0.2 and 0.5: mean(1.2, 1.5)
    assert float(flip_hinge(margins, 0.4, 1.0, prefix=1).detach()) == pytest.approx(1.35)
    # delta 0: a token already flipped costs nothing; MA inside the band and not verbatim: zero
    assert float(flip_hinge(torch.tensor([-0.5, 1.0, -2.0]), 0.6, 0.0, prefix=1)) == 0.0


def test_the_margin_has_the_logit_value_and_the_gradient_of_log_p():
    logits = torch.tensor([[2.0, 0.5, 1.5, -1.0]], requires_grad=True)
    margin = true_margins(torch.log_softmax(logits, -1), torch.tensor([[0]]))
    assert float(margin.detach()) == pytest.approx(2.0 - 1.5)  # z[x_t] - z[best rival]
    margin.sum().backward()
    p = torch.softmax(logits.detach(), -1)[0]
    # d log p(x_t) / dz = onehot - p: every other token gains by its probability, not the rival alone (which the
    # logit margin's gradient, onehot - onehot(rival), would give)
    assert logits.grad[0].tolist() == pytest.approx((torch.tensor([1.0, 0, 0, 0]) - p).tolist(), abs=1e-6)


def test_flip_hinge_breaks_a_verbatim_suffix_even_inside_the_band():
    # prefix P = 3: the suffix is margins[2:], all right: verbatim though MA 3/5 = 0.6 is not above 0.6
    assert float(flip_hinge(torch.tensor([-1.0, -2.0, 0.1, 3.0, 4.0]), 0.6, 1.0, prefix=3)) == pytest.approx(1.1)
    # MA 1.0 > 0.8: one flip, the cheapest (index 0, in the prefix); the suffix's cheapest (2.0) joins it
    value = flip_hinge(torch.tensor([0.05, 0.9, 2.0, 3.0]), 0.8, 1.0, prefix=3)
    assert float(value) == pytest.approx((1.05 + 3.0) / 2)


def test_hinge_loss_against_a_hand_computation(pair):
    model, tokenizer, forget, (low, high) = pair
    # one loss band for both: f0 under it (pushed to the middle), f5 over it (pulled back to the middle)
    middle, width = (low + high) / 2, (high - low) / 2
    lo, hi = middle - width / 2, middle + width / 2
    objective = hinge(tokenizer, ma_weight=0)  # the loss term alone (f0 is verbatim: the MA term would act)
    ctx, batch = step_context(model, tokenizer, forget, lo, hi)
    assert float(objective.loss(ctx, batch, None).detach()) == pytest.approx(((middle - low) + (high - middle)) / 2,
                                                                            rel=1e-5)
    assert batch.units(objective.averages_over) == 2  # a mean over sequences
    # with an MA band both are above: the MA term of each, by hand, joins its loss term
    band = Band("quantile:0.05,0.95", 0.1, 0.3, 20)
    ctx, batch = step_context(model, tokenizer, forget, lo, hi, band=band)
    expected = []
    for ids, term in zip(forget, (middle - low, high - middle), strict=True):
        margins = hand_margins(model, ids)
        right = sorted(m for m in margins if m > 0)
        flips = math.ceil(len(right) - len(margins) * 0.3 - 1e-9)
        assert len(right) / len(margins) > 0.3 and flips >= 1
        expected.append(term + 0.5 * sum(max(m + 2.0, 0.0) for m in right[:flips]) / flips)
    loss = hinge(tokenizer, ma_weight=0.5, delta=2.0).loss(ctx, batch, None)
    assert float(loss.detach()) == pytest.approx(sum(expected) / 2, rel=1e-4)


def z_of_row(row: list[float], target: int) -> float:
    """Min-K%++'s z of one position in plain Python: (log p(x) - mu) / sigma, mu and sigma the mean and std of
    log p(v) for v drawn from p."""
    top = max(row)
    logp = [v - top - math.log(sum(math.exp(w - top) for w in row)) for v in row]
    mu = sum(math.exp(lp) * lp for lp in logp)
    sigma = math.sqrt(sum(math.exp(lp) * lp * lp for lp in logp) - mu * mu)
    return (logp[target] - mu) / sigma


def hand_z(model, ids: list[int]) -> list[float]:
    """Min-K%++'s z_t for t = 2..T, one token at a time."""
    return [z_of_row(row, x) for row, x in logit_rows(model, ids)]


def test_minkpp_z_on_a_four_token_vocabulary():
    row = [2.0, 0.5, 1.5, -1.0]
    z = minkpp_z(torch.log_softmax(torch.tensor([row]), -1), torch.tensor([1]))
    assert float(z) == pytest.approx(z_of_row(row, 1), rel=1e-6)
    assert z_of_row(row, 1) == pytest.approx(-1.6869, abs=1e-3)  # by hand: p = (.532, .119, .323, .026)


def test_the_z_floor_against_a_hand_computation(pair):
    """Z_i = (1/n_i) sum_t relu(z_floor - z_t), added to the sequence's terms; off by default."""
    model, tokenizer, forget, _ = pair
    zs = [hand_z(model, ids) for ids in forget]
    floor = sorted(z for values in zs for z in values)[len(zs[0])]  # some tokens under it, most not
    ctx, batch = step_context(model, tokenizer, forget, 0.0, 100.0)  # both inside the loss band: no loss term
    expected = sum(sum(max(floor - z, 0.0) for z in values) / len(values) for values in zs) / 2
    assert expected > 0
    loss = hinge(tokenizer, ma_weight=0, z_floor=floor).loss(ctx, batch, None)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-4)
    assert float(hinge(tokenizer, ma_weight=0).loss(ctx, batch, None).detach()) == 0.0
    # its gradient raises the z of the tokens under the floor: one small step lowers the term
    loss.backward()
    with torch.no_grad():
        for param in model.parameters():
            if param.grad is not None:
                param -= 1e-3 * param.grad
    after = [hand_z(model, ids) for ids in forget]
    assert sum(sum(max(floor - z, 0.0) for z in values) / len(values) for values in after) / 2 < expected


def test_a_sequence_inside_both_bands_gets_no_gradient(pair):
    model, tokenizer, forget, (_, high) = pair
    objective = hinge(tokenizer)
    model.zero_grad(set_to_none=True)
    # f5: MA 0.67 under the band's 1.0, loss inside [high - 0.2, high + 0.2], not verbatim
    ctx, batch = step_context(model, tokenizer, forget, high - 0.2, high + 0.2, rows=(1,))
    loss = objective.loss(ctx, batch, None)
    assert float(loss.detach()) == 0.0
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert all(bool((g == 0).all()) for g in grads)


def test_two_way_selects_blocking_and_over_unlearned_sequences_and_nothing_in_the_band():
    above, over = [0, 3], [2, 3]
    assert selected(TWO_WAY, above, 5, over) == [0, 2, 3]  # 1 and 4 are inside the bands: nothing
    assert METHODS["hinge"].selection == TWO_WAY
    # the other selections are unchanged by the over-unlearned list
    assert selected("band", above, 5, over) == [0, 3] and selected("all", above, 5, over) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("direction", ["pull back", "push up"])
def test_one_step_moves_the_loss_the_way_the_band_says(pair, direction):
    model, tokenizer, forget, (low, _) = pair
    # pull back: the band lies under f0's loss; push up: over it
    lo, hi = (low - 2.0, low - 1.0) if direction == "pull back" else (low + 1.0, low + 2.0)
    ctx, batch = step_context(model, tokenizer, forget, lo, hi, rows=(0,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = hinge(tokenizer, ma_weight=0).loss(ctx, batch, None)
    assert float(loss.detach()) > 0
    loss.backward()
    optimizer.step()
    after = mean_nll(model, forget[0])
    assert (after < low) if direction == "pull back" else (after > low)


def test_the_ma_term_brings_an_extractable_sequence_into_the_band(pair):
    model, tokenizer, forget, (low, _) = pair
    margins = hand_margins(model, forget[0])
    ma = sum(m > 0 for m in margins) / len(margins)
    band = Band("quantile:0.05,0.95", ma - 0.3, ma - 0.15, 20)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    objective = hinge(tokenizer)
    for _ in range(8):  # the loss band is wide: only the MA term acts
        ctx, batch = step_context(model, tokenizer, forget, low - 5.0, low + 50.0, rows=(0,), band=band)
        optimizer.zero_grad()
        objective.loss(ctx, batch, None).backward()
        optimizer.step()
    after = hand_margins(model, forget[0])
    assert sum(m > 0 for m in after) / len(after) <= band.upper
    assert mean_nll(model, forget[0]) < low + 3.0  # flipped, not blown up


def neighbour_file(tmp_path, count: int = 10):
    from tiny import sentences

    path = tmp_path / "neighbours.jsonl"
    write_jsonl(path, [Sequence(f"n{i}", text) for i, text in enumerate(sentences(count, seed=7))])
    return path


def test_the_holdout_is_never_in_a_training_batch(tiny, tmp_path, monkeypatch):
    from unmemorize.io.sets import load_set
    from unmemorize.io.tokens import encode as encode_ids
    from unmemorize.runs.embedded import default_general

    seen: list[tuple[int, ...]] = []
    original = Batch.of.__func__

    def recording(cls, token_lists, indices, pad_id, device):
        seen.extend(tuple(token_lists[i]) for i in indices)
        return original(cls, token_lists, indices, pad_id, device)

    monkeypatch.setattr(Batch, "of", classmethod(recording))
    neighbours = load_set(neighbour_file(tmp_path))
    sets = {k: v for k, v in tiny["sets"].items() if k in ("forget", "holdout", "retain")}
    settings = UnlearnSettings(method="hinge", lr=1e-3, max_steps=4, stop="steps", max_utility_drop=10.0,
                               target="indistinguishable", recalibrate_every=1,
                               audit={"el_n": [], "prefix_tokens": 8, "batch_size": 8})
    result = unlearn(str(tiny["model"]), sets, default_general()[:10], settings, RUNTIME, tmp_path / "out",
                     neighbours=neighbours)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny["model"])
    holdout = {tuple(ids) for ids in encode_ids(tokenizer, sets["holdout"], 256)}
    trained = set(seen)
    assert trained, "no training batch was recorded"
    assert not trained & holdout
    assert {tuple(ids) for ids in encode_ids(tokenizer, neighbours, 256)} & trained  # the neighbours were used
    lines = [json.loads(line) for line in (tmp_path / "out" / "trajectory.jsonl").read_text().splitlines()]
    assert all("neighbour_kl" in line for line in lines if line["loss"] is not None)
    assert result.run["sets"]["neighbours"] == str(neighbours.source)


@pytest.mark.parametrize("case", ["missing", "bad_json", "forget", "holdout"])
def test_bad_neighbours_exit_2_with_one_line(tiny, tmp_path, case):
    path = tmp_path / "neighbours.jsonl"
    if case == "bad_json":
        path.write_text('{"id": "n0", "text": \n')
    elif case in ("forget", "holdout"):
        write_jsonl(path, [Sequence("n0", "k0 v1 k1 v2"), *[Sequence(f"copy{s.id}", s.text)
                                                            for s in tiny["sets"][case][:2]]])
    out = tmp_path / "run"
    result = run_cli("unlearn", "--model", tiny["model"], "--forget", tiny["files"]["forget"], "--holdout",
                     tiny["files"]["holdout"], "--neighbours", path, "--out", out, *FAST, env=ONE_THREAD)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert str(path) in lines[0]
    if case in ("forget", "holdout"):
        assert f"--neighbours {path} shares 2 sequence(s) with --{case} {tiny['files'][case]}" in lines[0]
    assert not out.exists() and not out.with_name("run.partial").exists()


def test_a_hinge_run_under_indistinguishable_reports_consistently(tiny, tmp_path):
    neighbours = neighbour_file(tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text(f"neighbours: {neighbours}\nneighbour_weight: 0.5\n")
    out = tmp_path / "run"
    result = run_cli("unlearn", "--model", tiny["model"], "--forget", tiny["files"]["forget"], "--holdout",
                     tiny["files"]["holdout"], "--retain", tiny["files"]["retain"], "--method", "hinge",
                     "--target", "indistinguishable", "--lr", "1e-3", "--max-steps", "15",
                     "--max-utility-drop", "10", "--config", config, "--out", out, *FAST, env=ONE_THREAD)
    assert result.returncode in (0, 3), result.stderr
    run, after = read_json(out / "run.json"), read_json(out / "after.json")
    forget = after["sets"]["forget"]
    clean = (forget["extractable"] == 0 and forget["verbatim"] == 0 and forget["loss_memorized"] == 0
             and forget["loss_over_unlearned"] == 0)
    assert run["target"] == "indistinguishable" and run["target_reached"] == clean
    assert (result.returncode == 0) == clean
    assert run["settings"]["neighbour_weight"] == 0.5
    assert run["sets"] == {"forget": str(tiny["files"]["forget"].resolve()),
                           "band": str(tiny["files"]["holdout"].resolve()),
                           "retain": str(tiny["files"]["retain"].resolve()), "neighbours": str(neighbours.resolve())}


class _Scored:
    """A forget sequence's scores as the target reads them."""

    def __init__(self, ma: float, loss: float) -> None:
        self.ma, self.loss = ma, loss

    def verbatim(self, prefix_tokens: int) -> bool:
        return False


@pytest.mark.parametrize("margin", [None, 0.0])
def test_the_margin_keeps_a_sequence_active_until_it_is_inside_by_the_margin(margin):
    from unmemorize.unlearning.target import Target

    settings = UnlearnSettings(method="hinge", margin=margin)  # None: hinge's own margin, 0.25
    band, loss_band = Band("quantile:0.05,0.95", 0.4, 0.6, 20), LossBand("quantile:0.05,0.95", 2.0, 3.0, 20)
    ctx = Context(model=None, runtime=RUNTIME, pad_id=0, forget_ids=[])
    target = Target(ctx, None, settings, band, 0.5, loss_band, pulls_back=True)
    # all four inside both bands; with a margin of 0.25 the aims are MA <= 0.55 and loss in [2.25, 2.75]
    scores = [_Scored(0.57, 2.5), _Scored(0.5, 2.1), _Scored(0.5, 2.5), _Scored(0.5, 2.9)]
    check = target.measure(scores)
    if margin is None:
        assert settings.aim_margin == 0.25 and target.aims == (Band("quantile:0.05,0.95", 0.45, 0.55, 20),
                                                               LossBand("quantile:0.05,0.95", 2.25, 2.75, 20))
        assert check.above == [0, 1] and check.over == [3]  # 2 alone is inside by the margin
    else:
        assert check.above == [] and check.over == []
    assert UnlearnSettings(method="sga").aim_margin == 0.0  # the other methods aim at the edges
