"""Utility (holdout perplexity), generation health (collapse into repetition) and downstream lm-eval tasks."""

from __future__ import annotations

import copy
import json
import math
import random

import pytest
import torch

from unmemorize.errors import InputError
from unmemorize.evaluate.health import distinct_share, generation_health, repeated_ngram_share
from unmemorize.io.tokens import encode
from unmemorize.measure.audit import AuditSettings, audit
from unmemorize.measure.utility import utility, utility_drop


@pytest.fixture(scope="module")
def tiny_ids(tiny, tiny_loaded) -> dict[str, list[list[int]]]:
    _, tokenizer, _ = tiny_loaded
    return {name: encode(tokenizer, seqs, 256) for name, seqs in tiny["sets"].items()}


def plain_perplexity(model, token_lists: list[list[int]]) -> float:
    """One unpadded forward per sequence, NLL summed over every predicted token."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in token_lists:
            x = torch.tensor([ids])
            logprobs = torch.log_softmax(model(input_ids=x).logits[0, :-1].double(), dim=-1)
            total -= logprobs.gather(-1, x[0, 1:, None]).sum().item()
            count += len(ids) - 1
    return math.exp(total / count)


def test_holdout_ppl_is_the_token_weighted_perplexity(tiny_loaded, tiny_ids):
    model, _, runtime = tiny_loaded
    holdout = tiny_ids["holdout"]
    assert len({len(ids) for ids in holdout}) > 1  # unequal lengths: token weighting differs from a mean of means
    result = utility(model, tiny_ids["retain"], tiny_ids["forget"], runtime, batch_size=3, holdout_ids=holdout)
    assert result["holdout_ppl"] == pytest.approx(plain_perplexity(model, holdout), rel=1e-5)
    assert result["general_ppl"] == pytest.approx(plain_perplexity(model, tiny_ids["forget"]), rel=1e-5)
    without = utility(model, tiny_ids["retain"], tiny_ids["forget"], runtime, batch_size=3)
    assert without["holdout_ppl"] is None
    assert without["general_ppl"] == pytest.approx(result["general_ppl"], rel=1e-6)
    assert utility_drop(without, result) == pytest.approx(0.0, abs=1e-6)


def test_utility_from_an_audit_is_the_utility_scored_again(tiny, tiny_loaded, tiny_ids):
    model, tokenizer, runtime = tiny_loaded
    sets = {name: tiny["sets"][name] for name in ("forget", "holdout", "retain")}
    audited = audit(model, tokenizer, sets, AuditSettings(el_n=[], batch_size=3), runtime)
    scored = utility(model, tiny_ids["retain"], tiny_ids["forget"], runtime, batch_size=3,
                     holdout_ids=tiny_ids["holdout"])
    reused = utility(model, tiny_ids["retain"], tiny_ids["forget"], runtime, batch_size=3,
                     holdout_ids=tiny_ids["holdout"], audited=audited)
    assert reused == pytest.approx(scored, rel=1e-6)  # audits score fully, utility leanly: float rounding apart
    # the rows really stand in: an audit of another model gives other numbers
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.lm_head.weight.mul_(0.5)
    elsewhere = audit(other, tokenizer, sets, AuditSettings(el_n=[], batch_size=3), runtime)
    wrong = utility(model, tiny_ids["retain"], tiny_ids["forget"], runtime, batch_size=3,
                    holdout_ids=tiny_ids["holdout"], audited=elsewhere)
    assert wrong["holdout_ppl"] != pytest.approx(scored["holdout_ppl"], rel=1e-3)
    assert wrong["general_ppl"] == pytest.approx(scored["general_ppl"], rel=1e-9)  # general is always scored


def test_repeated_ngram_share_by_hand():
    tokens = [1, 2, 3, 1, 2, 3, 1]
    # bigrams 12 23 31 12 23 31: the last three repeat earlier ones
    assert repeated_ngram_share(tokens, 2) == pytest.approx(3 / 6)
    # trigrams 123 231 312 123 231: two repeats
    assert repeated_ngram_share(tokens, 3) == pytest.approx(2 / 5)
    assert repeated_ngram_share(list(range(10)), 3) == 0.0
    assert repeated_ngram_share([7] * 10, 3) == pytest.approx(7 / 8)
    assert repeated_ngram_share([1, 2], 3) is None
    # two identical continuations: each alone has no repeat, together half their bigrams are duplicates
    assert distinct_share([[1, 2, 3], [1, 2, 3]], 2) == pytest.approx(2 / 4)


def one_token_model(model, token: int):
    """A copy of `model` whose output layer has a bias that makes `token` win at every position."""
    collapsed = copy.deepcopy(model)
    old = collapsed.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)  # untied copy: the input embeddings stay as they were
        head.bias.zero_()
        head.bias[token] = 1e4
    collapsed.lm_head = head
    return collapsed.eval()


def test_generation_health_sees_a_collapsed_model(tiny_loaded, tiny_ids):
    model, _, runtime = tiny_loaded
    general = tiny_ids["holdout"]
    settings = {"prompts": 6, "prompt_tokens": 8, "new_tokens": 24, "n": 3, "batch_size": 4}
    normal = generation_health(model, general, runtime, **settings)
    collapsed = generation_health(one_token_model(model, token=5), general, runtime, **settings)
    assert collapsed["repeated_ngram_share"] == pytest.approx((24 - 3) / (24 - 3 + 1))
    assert collapsed["distinct_n"] == pytest.approx(1 / (6 * 22))
    assert normal["repeated_ngram_share"] < 0.5  # the trained tiny model writes varied records
    assert normal["prompts"] == 6 and normal["new_tokens"] == 24 and normal["n"] == 3


def test_shipped_task_data_is_well_formed():
    from unmemorize.evaluate.downstream import TASKS_DIR

    folder = TASKS_DIR / "unmemorize_pyfacts"
    rows = [json.loads(line) for line in (folder / "pyfacts.jsonl").read_text().splitlines()]
    assert len(rows) >= 40
    assert len({r["id"] for r in rows}) == len(rows)
    for row in rows:
        assert len(set(row["choices"])) == 4 and 0 <= row["answer"] < 4
    assert (folder / "unmemorize_pyfacts.yaml").is_file()


def test_downstream_runs_the_shipped_task_offline(tiny_loaded):
    from unmemorize.evaluate.downstream import downstream

    model, tokenizer, _ = tiny_loaded
    random.seed(1)
    torch.manual_seed(1)
    expected_draw = torch.rand(1)
    torch.manual_seed(1)
    result = downstream(model, tokenizer, ["unmemorize_pyfacts"], limit=5, batch_size=4)
    scores = result["unmemorize_pyfacts"]
    assert scores["n_docs"] == 5
    assert 0.0 <= scores["acc"] <= 1.0 and 0.0 <= scores["acc_norm"] <= 1.0
    assert all(isinstance(v, int | float) and math.isfinite(v) for v in scores.values())
    assert json.loads(json.dumps(result)) == result
    assert torch.equal(torch.rand(1), expected_draw)  # lm-eval's reseeding did not leak into the caller


def test_downstream_unknown_task_is_an_input_error(tiny_loaded):
    from unmemorize.evaluate.downstream import downstream

    model, tokenizer, _ = tiny_loaded
    with pytest.raises(InputError, match="no_such_task_xyz"):
        downstream(model, tokenizer, ["unmemorize_pyfacts", "no_such_task_xyz"], limit=2)
