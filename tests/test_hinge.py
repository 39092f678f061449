"""The two-way hinge (method `hinge`): its loss against a hand computation, one step in each direction, the
`two_way` selection, `--neighbours` (KL on unseen in-domain text; never the holdout) and a short run."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from clirun import run_cli
from conftest import read_json
from test_methods import hand_logprobs

from unmemorize.io.models import make_runtime
from unmemorize.io.sets import Sequence, write_jsonl
from unmemorize.io.tokens import encode, pad_id_of
from unmemorize.measure.band import Band, LossBand
from unmemorize.runs.config import UnlearnSettings
from unmemorize.runs.run import unlearn
from unmemorize.unlearning.context import Batch, Context, StepState
from unmemorize.unlearning.methods import METHODS, TWO_WAY
from unmemorize.unlearning.target import FORGET, PULL_BACK, directions, selected

RUNTIME = make_runtime("cpu", "float32")
FLOAT32 = ["--device", "cpu", "--dtype", "float32"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
FAST = ["--el-n", "0", "--prefix-tokens", "8", *FLOAT32]
BAND = Band("quantile:0.05,0.95", 0.4, 0.6, 20)


def hinge(tokenizer, **args):
    settings = UnlearnSettings(method="hinge", method_args=args)
    return settings.spec.build(settings.method_args, tokenizer)[0]


def mean_nll(model, ids: list[int]) -> float:
    logprobs = hand_logprobs(model, ids)
    return -sum(logprobs) / len(logprobs)


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


def step_context(model, tokenizer, forget, lo, hi, direction) -> tuple[Context, Batch]:
    ctx = Context(model=model, runtime=RUNTIME, pad_id=pad_id_of(tokenizer), forget_ids=forget)
    ctx.step = StepState(BAND, LossBand("quantile:0.05,0.95", lo, hi, 20), direction)
    return ctx, Batch.of(forget, sorted(direction), ctx.pad_id, RUNTIME.device)


def test_hinge_loss_is_the_mean_distance_to_each_target(pair):
    model, tokenizer, forget, (low, high) = pair
    # one band for both: f0 under it (forget: target the middle), f5 over it (pull back to the middle)
    middle, width = (low + high) / 2, (high - low) / 2
    lo, hi = middle - width / 2, middle + width / 2
    ctx, batch = step_context(model, tokenizer, forget, lo, hi, {0: FORGET, 1: PULL_BACK})
    objective = hinge(tokenizer)
    loss = float(objective.loss(ctx, batch, None).detach())
    assert loss == pytest.approx(((middle - low) + (high - middle)) / 2, rel=1e-5)
    assert batch.units(objective.averages_over) == 2  # a mean over sequences
    # past the middle but still blocking: pushed to the upper edge, not beyond
    ctx, batch = step_context(model, tokenizer, forget, low - 0.4, low + 0.2, {0: FORGET})
    assert float(objective.loss(ctx, batch, None).detach()) == pytest.approx(0.2, rel=1e-4)
    # margin: the upper edge moves in by margin * width
    ctx, batch = step_context(model, tokenizer, forget, low - 0.4, low + 0.2, {0: FORGET})
    assert float(hinge(tokenizer, margin=0.25).loss(ctx, batch, None).detach()) == pytest.approx(0.2 - 0.15, rel=1e-3)
    # the mean rule (no upper edge): lo is the only target
    ctx, batch = step_context(model, tokenizer, forget, low + 0.3, None, {0: FORGET})
    assert float(objective.loss(ctx, batch, None).detach()) == pytest.approx(0.3, rel=1e-4)


def test_a_sequence_inside_its_target_gets_no_gradient(pair):
    model, tokenizer, forget, (low, high) = pair
    objective = hinge(tokenizer)
    # pull back, loss already under the middle; forget, loss already over the upper edge: both zero
    for lo, hi, direction in [(low - 0.2, low + 1.0, {0: PULL_BACK}), (high - 1.0, high - 0.1, {1: FORGET})]:
        model.zero_grad(set_to_none=True)
        ctx, batch = step_context(model, tokenizer, forget, lo, hi, direction)
        loss = objective.loss(ctx, batch, None)
        assert float(loss.detach()) == 0.0
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert all(bool((g == 0).all()) for g in grads)


def test_two_way_selects_blocking_and_over_unlearned_sequences_and_nothing_in_the_band():
    above, over = [0, 3], [2, 3]  # 3 is both blocking on MA and over the loss band: it is pushed, not pulled
    active = selected(TWO_WAY, above, 5, over)
    assert active == [0, 2, 3]  # 1 and 4 are inside the bands: nothing
    assert directions(active, above) == {0: FORGET, 2: PULL_BACK, 3: FORGET}
    assert METHODS["hinge"].selection == TWO_WAY
    # the other selections are unchanged by the over-unlearned list
    assert selected("band", above, 5, over) == [0, 3] and selected("all", above, 5, over) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("direction", [PULL_BACK, FORGET])
def test_one_step_moves_the_loss_the_way_it_is_told(pair, direction):
    model, tokenizer, forget, (low, _) = pair
    # pull back: the band lies under f0's loss; forget: over it
    lo, hi = (low - 2.0, low - 1.0) if direction == PULL_BACK else (low + 1.0, low + 2.0)
    ctx, batch = step_context(model, tokenizer, forget, lo, hi, {0: direction})
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = hinge(tokenizer).loss(ctx, batch, None)
    assert float(loss.detach()) > 0
    loss.backward()
    optimizer.step()
    after = mean_nll(model, forget[0])
    assert (after < low) if direction == PULL_BACK else (after > low)


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
