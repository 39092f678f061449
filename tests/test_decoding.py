"""Decoding-time guards (DPD, n-gram output filter) on the tiny memorizing model, measured by the same audit."""

from __future__ import annotations

import math

import pytest
import torch

from unmemorize.errors import InputError
from unmemorize.evaluate.decoding import (
    BLOCKED_LOGPROB,
    DecodingSpec,
    NgramFilter,
    PrivateDecoding,
    describe,
    guard,
    parse_decoding,
)
from unmemorize.io.tokens import encode
from unmemorize.measure.audit import AuditSettings, audit
from unmemorize.measure.extraction import el_from_continuations, greedy_continue, reference_extraction_likelihoods

SETTINGS = AuditSettings(el_n=[2, 4], prefix_tokens=8, batch_size=3, el_sets=None)  # EL on every set
MEMORIZED = ("f0", "f1", "f2", "f3")  # repeated 8 times in training


@pytest.fixture(scope="module")
def sets(tiny):
    return {name: tiny["sets"][name] for name in ("forget", "holdout")}


@pytest.fixture(scope="module")
def ids_of(tiny, tiny_loaded):
    tokenizer = tiny_loaded[1]
    return {seq.id: encode(tokenizer, [seq], 256)[0] for v in tiny["sets"].values() for seq in v}


@pytest.fixture(scope="module")
def forget_ids(tiny, ids_of):
    return [ids_of[seq.id] for seq in tiny["sets"]["forget"]]


@pytest.fixture(scope="module")
def audits(tiny_loaded, sets, forget_ids):
    model, tokenizer, runtime = tiny_loaded
    guards = {"plain": model, "dpd": guard(model, parse_decoding("dpd:0.5"), forget_ids),
              "filter": guard(model, parse_decoding("filter:4"), forget_ids)}
    return {name: audit(m, tokenizer, sets, SETTINGS, runtime) for name, m in guards.items()}, guards


def rows(result, set_name="forget"):
    return {r.id: r for r in result.of(set_name)}


def greedy_loop(model, prompt: list[int], total: int) -> list[int]:
    """Greedy continuation to length `total`, one full forward per token, no KV cache."""
    generated = list(prompt)
    with torch.no_grad():
        while len(generated) < total:
            generated.append(int(model(input_ids=torch.tensor([generated])).logits[0, -1].argmax()))
    return generated[len(prompt) :]


# --- DPD ---------------------------------------------------------------------------------------------------


def test_dpd_logits_are_the_log_of_the_mixture_with_uniform(tiny_loaded, ids_of):
    model = tiny_loaded[0]
    width = min(len(ids_of["f0"]), len(ids_of["h3"]))
    ids = torch.tensor([ids_of["f0"][:width], ids_of["h3"][:width]])
    for lam in (0.0, 0.2, 0.5, 0.9):
        with torch.no_grad():
            guarded = PrivateDecoding(model, lam)(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            logits = model(input_ids=ids).logits
            p = torch.softmax(logits.double(), dim=-1)
        expected = torch.log((1 - lam) * p + lam / p.shape[-1])
        assert guarded.dtype == torch.float32
        torch.testing.assert_close(guarded.double(), expected, atol=1e-5, rtol=0)
        # sum_v exp(g_v) - 1 = sum_v p'_v * d_v, a p'-weighted mean of the float32 errors d_v of the guarded
        # log-probabilities g_v, so at most the largest d_v: a few float32 ulps of the numbers log_softmax and
        # logaddexp handle (logits and log-normalizer, |x| ~ 10 here, ulp ~ 1e-6). Observed: 2e-7 on an AVX2
        # CPU (the default 1e-7 + 1e-7 failed there), 1.9e-7 with AVX-512. Allowed: 4 ulps at the logits'
        # scale (~5e-6 here), well under what a mis-normalized mixture gives (lam / V^2 ~ 1e-4 or more).
        atol = 4 * torch.finfo(torch.float32).eps * max(1.0, logits.abs().max().item())
        torch.testing.assert_close(guarded.double().exp().sum(-1), torch.ones(ids.shape, dtype=torch.float64),
                                   atol=atol, rtol=0)


def test_dpd_leaves_greedy_measures_exactly_as_they_were_and_raises_the_forget_loss(audits):
    results, _ = audits
    plain, dpd = results["plain"], results["dpd"]
    for set_name in ("forget", "holdout"):
        for sid, row in rows(plain, set_name).items():
            other = rows(dpd, set_name)[sid]
            assert (other.ma, other.verbatim, other.el, other.status) == (row.ma, row.verbatim, row.el, row.status)
    # The finding: DPD does nothing against greedy extraction; the memorized records stay verbatim.
    assert dpd.summary("forget")["verbatim"] == plain.summary("forget")["verbatim"] >= 4
    assert dpd.summary("forget")["mean_loss"] > plain.summary("forget")["mean_loss"] + 0.3
    assert all(math.isfinite(v) for k, v in dpd.privacy.items() if k.endswith("_auc"))


def test_generate_goes_through_the_guard_before_any_processor(tiny_loaded, ids_of):
    model = tiny_loaded[0]
    dpd = PrivateDecoding(model, 0.5)
    prompt = torch.tensor([ids_of["f1"][:5]])
    out = dpd.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=3,
                       eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        step0 = dpd(input_ids=prompt).logits[:, -1]
    torch.testing.assert_close(out.logits[0], step0)  # what sampling would draw from is p', not p
    assert "forward" not in model.__dict__  # the wrapped model is left as it was


# --- n-gram filter -----------------------------------------------------------------------------------------


def test_filter_blocks_exactly_the_forget_ngram_continuations_and_renormalizes(tiny_loaded, ids_of, forget_ids):
    model = tiny_loaded[0]
    n = 4
    filt = NgramFilter(model, forget_ids, n)
    for sid in ("f0", "f5", "h0"):
        ids = ids_of[sid]
        with torch.no_grad():
            guarded = filt(input_ids=torch.tensor([ids])).logits[0].double()
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
        for t in range(len(ids)):
            context = ids[max(0, t + 2 - n) : t + 1]
            blocked = {f[i + n - 1] for f in forget_ids for i in range(len(f) - n + 1)
                       if len(context) == n - 1 and f[i : i + n - 1] == context}
            allowed = [v for v in range(logp.shape[-1]) if v not in blocked]
            kept = logp[t, allowed].exp().sum()
            torch.testing.assert_close(guarded[t, allowed], logp[t, allowed] - kept.log(), atol=1e-5, rtol=0)
            assert all(guarded[t, v] == BLOCKED_LOGPROB for v in blocked)
            if sid == "f0" and t >= n - 2:  # the true next token of a forget sequence is always blocked
                assert t + 1 == len(ids) or ids[t + 1] in blocked


def test_filter_leaves_the_distribution_alone_when_every_token_would_be_blocked(tiny_loaded):
    model = tiny_loaded[0]
    vocab = model.config.vocab_size
    prompt = torch.tensor([[5, 6]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=prompt).logits[0, -1], dim=-1)
        everything = NgramFilter(model, [[5, 6, v] for v in range(vocab)], 3)(input_ids=prompt).logits[0, -1]
        all_but_7 = NgramFilter(model, [[5, 6, v] for v in range(vocab) if v != 7], 3)(input_ids=prompt).logits[0, -1]
    torch.testing.assert_close(everything, logp)
    assert all_but_7[7] == 0 and int(all_but_7.argmax()) == 7


def test_filter_under_the_audit_removes_extraction_and_makes_the_forget_set_stand_out(audits):
    results, _ = audits
    plain, filt = results["plain"], results["filter"]
    before, after = rows(plain), rows(filt)
    assert all(before[s].verbatim and before[s].ma > 0.9 for s in MEMORIZED)
    assert not any(r.verbatim for r in after.values())
    assert all(after[s].ma < 0.15 for s in MEMORIZED)  # only the first n-1 predictions can still be right
    assert all(r.el["4"] == 0 for r in after.values())  # greedy decoding can never complete a forget 4-gram
    holdout_shift = filt.summary("holdout")["mean_ma"] - plain.summary("holdout")["mean_ma"]
    assert abs(holdout_shift) < 0.02
    # The price: far below unseen data (over_unlearned), and the blocked tokens' loss gives the set away.
    assert filt.summary("forget")["over_unlearned"] == len(after)
    assert filt.privacy["loss_auc"] < 0.05 and filt.privacy["umia_auc"] > 0.95


def test_filter_el_through_the_kv_cache_equals_a_per_prefix_loop_without_cache(tiny_loaded, audits, ids_of):
    results, guards = audits
    filt = guards["filter"]
    el = {r.id: r.el for r in results["filter"].sequences}
    for sid in ("f0", "f5", "h0", "h3"):
        ids = ids_of[sid]
        continuations = {t: greedy_loop(filt, ids[:t], len(ids)) for t in range(1, len(ids) - 1)}
        expected = {str(n): el_from_continuations(ids, continuations, n) for n in (2, 4)}
        assert el[sid] == expected, sid
    assert 0 < el["f0"]["2"] < 1 and rows(results["plain"])["f0"].el["4"] > 0.9  # the filter acted in decoding
    # the per-prefix `generate` reference runs through the guard too
    runtime = tiny_loaded[2]
    assert reference_extraction_likelihoods(filt, ids_of["f5"], [2, 4], runtime) == el["f5"]


def test_filter_history_follows_left_padded_batches_under_the_cache(tiny_loaded, ids_of, forget_ids):
    model, _, runtime = tiny_loaded
    f0 = ids_of["f0"]
    # The model continues f0[9:11] with f0[11]. Padding with f0[8] would make (f0[8], f0[9], f0[10]) look like
    # a 3-token context and block f0[11] under n=4: only the attention mask says that padding is not context.
    prompts = [f0[9:11], f0[10:11], ids_of["f2"][:8], ids_of["h1"][:5], ids_of["f4"][:3], f0[:6]]
    new_tokens = [10, 11, 6, 9, 12, 7]
    for n, pad_id in ((3, f0[9]), (4, f0[8])):
        filt = NgramFilter(model, forget_ids, n)
        batched = greedy_continue(filt, prompts, new_tokens, runtime, batch_size=6, pad_id=pad_id)
        for prompt, count, got in zip(prompts, new_tokens, batched, strict=True):
            assert got == greedy_loop(filt, prompt, len(prompt) + count)


def test_a_cache_that_does_not_continue_the_guarded_decoding_is_refused(tiny_loaded, ids_of, forget_ids):
    model = tiny_loaded[0]
    filt = NgramFilter(model, forget_ids, 4)
    with torch.no_grad():
        filt(input_ids=torch.tensor([ids_of["f0"][:5]]), use_cache=True)
        other = model(input_ids=torch.tensor([ids_of["h0"][:7]]), use_cache=True).past_key_values
        with pytest.raises(RuntimeError, match="does not continue"):
            filt(input_ids=torch.tensor([[3]]), past_key_values=other, use_cache=True)


# --- spec, description, wrapper ----------------------------------------------------------------------------


def test_parse_decoding_accepts_the_two_forms_and_refuses_the_rest():
    assert parse_decoding("dpd:0.5") == DecodingSpec("dpd", lam=0.5)
    assert parse_decoding("dpd:0") == DecodingSpec("dpd", lam=0.0)
    assert parse_decoding("filter:6") == DecodingSpec("filter", n=6)
    assert parse_decoding("filter") == DecodingSpec("filter", n=4)
    assert str(parse_decoding("dpd:0.25")) == "dpd:0.25" and str(parse_decoding("filter")) == "filter:4"
    for bad in ("", "dpd", "dpd:", "dpd:x", "dpd:1", "dpd:-0.1", "dpd:nan", "filter:", "filter:0", "filter:2.5",
                "filter:x", "gauss:1", "DPD:0.5"):
        with pytest.raises(InputError) as error:
            parse_decoding(bad)
        assert "--decoding" in str(error.value) and "\n" not in str(error.value)


def test_describe_says_the_weights_are_unchanged():
    for spec in ("dpd:0.5", "filter:4"):
        info = describe(parse_decoding(spec))
        assert info["weights_changed"] is False and info["decoding"] == spec and info["explanation"]
    assert describe(parse_decoding("dpd:0.5"))["keeps_argmax"] is True


def test_the_wrapper_passes_the_model_through(tiny_loaded, forget_ids):
    model = tiny_loaded[0]
    for spec in ("dpd:0.3", "filter:3"):
        wrapped = guard(model, parse_decoding(spec), forget_ids)
        assert wrapped.config is model.config and wrapped.device == model.device
        assert all(p is q for p, q in zip(wrapped.parameters(), model.parameters(), strict=True))
    with pytest.raises(ValueError, match="inference"):
        guard(model, parse_decoding("dpd:0.3"), []).forward(input_ids=torch.tensor([[3, 4]]),
                                                            labels=torch.tensor([[3, 4]]))
