"""Input guards (ICUL, prompt guardrail, input filter) on the tiny memorizing model, measured by the same audit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from clirun import assert_refused, run_cli
from conftest import read_json

from unmemorize.errors import InputError
from unmemorize.evaluate.attacks import AttackSettings, run_attacks
from unmemorize.evaluate.decoding import DEPLOYMENT_NOTE, DecodingSpec, describe, guard, parse_decoding
from unmemorize.evaluate.input_guards import (
    DEFAULT_INSTRUCTION,
    InputFilter,
    PromptGuard,
    icul_context,
    separator_ids,
)
from unmemorize.io.sets import write_jsonl
from unmemorize.io.tokens import encode
from unmemorize.measure.audit import AuditSettings, audit
from unmemorize.measure.extraction import extraction_likelihoods, greedy_continue, reference_extraction_likelihoods
from unmemorize.measure.scoring import score_tokens

WINDOW = 8  # the audit's --prefix-tokens in these tests: the input filter's window
SETTINGS = AuditSettings(el_n=[4], prefix_tokens=WINDOW, batch_size=3)
MEMORIZED = ("f0", "f1", "f2", "f3")  # repeated 8 times in training
EOS = 2  # the tiny tokenizer's <eos>: its separator (it has no newline token)


@pytest.fixture(scope="module")
def ids(tiny, tiny_loaded):
    tokenizer = tiny_loaded[1]
    return {name: encode(tokenizer, seqs, 256) for name, seqs in tiny["sets"].items()}


def make(tiny_loaded, ids, spec: str, forget: int = 8):
    """The guard `spec` around the tiny model, made from the first `forget` forget sequences."""
    model, tokenizer, _ = tiny_loaded
    return guard(model, parse_decoding(spec), ids["forget"][:forget], tokenizer=tokenizer, retain_ids=ids["retain"],
                 prefix_tokens=WINDOW)


def greedy_loop(model, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy continuation, one full forward of the whole sequence per token: no KV cache, no padding."""
    generated = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            generated.append(int(model(input_ids=torch.tensor([generated])).logits[0, -1].argmax()))
    return generated[len(prompt) :]


# --- prompt construction -----------------------------------------------------------------------------------


def test_icul_context_is_each_forget_prefix_with_a_changed_continuation_then_k_retain_records():
    forget = [[10, 11, 12, 13, 14, 15], [20, 21, 22, 23, 24, 25, 26, 27]]
    retain = [[30, 31, 32, 33], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49], [50, 51, 52, 53, 54, 55], [60, 61]]
    # prefix_tokens 3: P = min(3, 6 // 2) = 3 and min(3, 8 // 2) = 3. K = 2: the changed continuations are the
    # suffixes of retain 2 and retain 3 after their own P (min(3, 3) = 3 and min(3, 1) = 1), cut to the forget
    # suffix's length (3 and 5 tokens); then retain 0 and 1 whole; every record ends with the separator 9.
    assert icul_context(forget, retain, 2, 3, [9]) == [
        10, 11, 12, 53, 54, 55, 9,
        20, 21, 22, 61, 9,
        30, 31, 32, 33, 9,
        40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 9,
    ]
    # K = 0: only the forget prefixes, continued by retain 0 and 1 (cyclically over the retain set with K = 3)
    assert icul_context(forget[:1], retain, 0, 2, []) == [10, 11, 32, 33]
    assert icul_context(forget, retain[:3], 3, 2, [])[:6] == [10, 11, 32, 33, 20, 21]
    with pytest.raises(InputError, match="retain"):
        icul_context(forget, retain[:1], 2, 3, [9])
    with pytest.raises(InputError, match="retain"):
        icul_context(forget, [], 0, 3, [9])


def test_guard_contexts_on_the_tiny_tokenizer(tiny_loaded, ids):
    tokenizer = tiny_loaded[1]
    assert separator_ids(tokenizer) == [EOS]  # no newline token: the EOS separates records
    icul = make(tiny_loaded, ids, "icul:1", forget=2)
    f0, f1, r0, r1, r2 = ids["forget"][0], ids["forget"][1], *ids["retain"][:3]
    cut = [min(WINDOW, len(f) // 2) for f in (f0, f1)]
    expected = [*f0[: cut[0]], *r1[min(WINDOW, len(r1) // 2) :][: len(f0) - cut[0]], EOS,
                *f1[: cut[1]], *r2[min(WINDOW, len(r2) // 2) :][: len(f1) - cut[1]], EOS, *r0, EOS]
    assert isinstance(icul, PromptGuard) and icul.context == expected
    guardrail = make(tiny_loaded, ids, "guardrail:k0 v1 not-a-word")
    assert guardrail.context == [*tokenizer("k0 v1 not-a-word")["input_ids"], EOS] == [3, 16, 1, EOS]
    assert len(make(tiny_loaded, ids, "guardrail").context) == len(DEFAULT_INSTRUCTION.split()) + 1


def test_an_icul_context_that_does_not_fit_the_model_is_refused(tiny_loaded, ids):
    with pytest.raises(InputError, match="context"):  # 8 forget records and a retain one: over 128 positions
        make(tiny_loaded, ids, "icul:1")


# --- alignment: scores are the input's own positions -------------------------------------------------------


def test_prompt_guard_scores_are_the_bare_models_scores_after_the_context(tiny_loaded, ids):
    model, _, runtime = tiny_loaded
    icul = make(tiny_loaded, ids, "icul:1", forget=2)
    context = icul.context
    inputs = [ids["forget"][0], ids["holdout"][0], ids["forget"][5][:9], ids["retain"][4]]  # unequal lengths
    guarded = score_tokens(icul, inputs, runtime, batch_size=4)  # one right-padded batch
    for x, scores in zip(inputs, guarded, strict=True):
        bare = score_tokens(model, [context + x], runtime)[0]
        assert len(scores.hits) == len(x) - 1  # the context contributes no scored position
        np.testing.assert_array_equal(scores.hits, bare.hits[len(context) :])
        np.testing.assert_allclose(scores.logprobs, bare.logprobs[len(context) :], atol=1e-4)
    # the context matters: f0 is memorized bare, and ICUL's context (f0's prefix, another continuation) moves it
    assert score_tokens(model, [inputs[0]], runtime)[0].ma > 0.9 > guarded[0].ma
    empty = score_tokens(PromptGuard(model, []), inputs, runtime, batch_size=4)
    bare = score_tokens(model, inputs, runtime, batch_size=4)
    for a, b in zip(empty, bare, strict=True):
        np.testing.assert_array_equal(a.hits, b.hits)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_prompt_guard_decoding_under_the_kv_cache_continues_the_context(tiny_loaded, ids):
    model, _, runtime = tiny_loaded
    icul = make(tiny_loaded, ids, "icul:1", forget=2)
    prompts = [ids["forget"][0][:3], ids["forget"][1][:9], ids["holdout"][2][:5], ids["forget"][4][:1]]
    new_tokens = [7, 4, 6, 9]
    got = greedy_continue(icul, prompts, new_tokens, runtime, batch_size=4, pad_id=0)  # left-padded, KV cache
    for prompt, count, tokens in zip(prompts, new_tokens, got, strict=True):
        assert tokens == greedy_loop(model, icul.context + prompt, count)
    # EL: the shortcut over teacher-forced guesses equals one `generate` per prefix, through the guard
    for x in (ids["forget"][1], ids["holdout"][2]):
        scores = score_tokens(icul, [x], runtime)
        shortcut = extraction_likelihoods(icul, scores, [2, 4], runtime, batch_size=8)[0]
        assert shortcut == reference_extraction_likelihoods(icul, x, [2, 4], runtime)


# --- the input filter --------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["input_filter", "input_filter:embed"])
def test_input_filter_refuses_a_forget_prefix_and_not_a_holdout_prefix(tiny_loaded, ids, spec):
    model = tiny_loaded[0]
    filt = make(tiny_loaded, ids, spec)
    assert isinstance(filt, InputFilter)
    uniform = -math.log(model.config.vocab_size)
    for x, refused in ((ids["forget"][0], True), (ids["forget"][6], True), (ids["holdout"][0], False),
                       (ids["holdout"][7], False), (ids["retain"][3], False)):
        with torch.no_grad():
            guarded = filt(input_ids=torch.tensor([x])).logits[0]
            bare = torch.log_softmax(model(input_ids=torch.tensor([x])).logits[0].float(), dim=-1)
        # Before the window is full the input is the model's; from the WINDOW-th token on, refused or not.
        torch.testing.assert_close(guarded[: WINDOW - 1], bare[: WINDOW - 1], atol=1e-5, rtol=0)
        if refused:
            assert torch.all(guarded[WINDOW - 1 :] == uniform)
        else:
            torch.testing.assert_close(guarded[WINDOW - 1 :], bare[WINDOW - 1 :], atol=1e-5, rtol=0)
    # A forget prefix shorter than the window is not judged yet.
    with torch.no_grad():
        short = filt(input_ids=torch.tensor([ids["forget"][0][: WINDOW - 1]])).logits[0]
    assert not torch.any(short == uniform)


def test_the_filters_scores_separate_forget_prefixes_from_unseen_ones(tiny_loaded, ids):
    model = tiny_loaded[0]
    ngram, embed = make(tiny_loaded, ids, "input_filter"), make(tiny_loaded, ids, "input_filter:embed")

    def scores(name):
        out = []
        for x in ids[name]:
            q = x[:WINDOW]
            with torch.no_grad():
                mean = model(input_ids=torch.tensor([q]), output_hidden_states=True).hidden_states[-1][0].mean(0)
            out.append((ngram.score(q), embed.score(q, mean)))
        return np.array(out)

    forget, holdout = scores("forget"), scores("holdout")
    np.testing.assert_allclose(forget, 1.0, atol=1e-5)  # a forget prefix is its own best match
    assert holdout[:, 0].max() < 0.6 and holdout[:, 1].max() < 0.99  # below the default thresholds


@pytest.mark.parametrize("spec", ["input_filter", "input_filter:embed"])
def test_input_filter_decoding_under_the_kv_cache_equals_a_loop_without_cache(tiny_loaded, ids, spec):
    runtime = tiny_loaded[2]
    filt = make(tiny_loaded, ids, spec)
    # Prompts shorter than the window: the verdict comes while decoding, from prompt and generated tokens.
    prompts = [ids["forget"][0][:3], ids["forget"][2][:WINDOW], ids["holdout"][1][:5], ids["forget"][5][:10]]
    new_tokens = [9, 5, 8, 4]
    got = greedy_continue(filt, prompts, new_tokens, runtime, batch_size=4, pad_id=ids["forget"][0][3])
    for prompt, count, tokens in zip(prompts, new_tokens, got, strict=True):
        assert tokens == greedy_loop(filt, prompt, count)
    assert got[0][WINDOW - 3 :] == [0] * (9 - WINDOW + 3)  # refused: the uniform's argmax, token 0
    assert got[1] == [0] * 5 and 0 not in got[2]
    # EL's shortcut equals one `generate` per prefix through the filter (logits of the last position only there)
    for x in (ids["forget"][1], ids["holdout"][4]):
        scores = score_tokens(filt, [x], runtime)
        assert extraction_likelihoods(filt, scores, [2, 4], runtime)[0] == \
            reference_extraction_likelihoods(filt, x, [2, 4], runtime)


# --- audits and attacks through the guards -----------------------------------------------------------------


def rows(result, set_name="forget"):
    return {r.id: r for r in result.of(set_name)}


def test_audits_through_each_input_guard(tiny, tiny_loaded, ids):
    model, tokenizer, runtime = tiny_loaded
    sets = {"forget": tiny["sets"]["forget"][:2], "holdout": tiny["sets"]["holdout"]}
    plain = audit(model, tokenizer, sets, SETTINGS, runtime)
    assert plain.summary("forget")["extractable"] == 2 and plain.summary("forget")["verbatim"] == 2
    for spec in ("icul:1", "guardrail", "input_filter", "input_filter:embed"):
        measured = make(tiny_loaded, ids, spec, forget=2)
        result = audit(measured, tokenizer, sets, SETTINGS, runtime)
        summary = result.summary("forget")
        assert summary["n"] == 2 and len(result.of("holdout")) == 20 and result.band is not None
        if spec.startswith("input_filter"):
            # Refused from the window on: nothing extractable or verbatim; below unseen text (over_unlearned).
            assert summary["extractable"] == summary["verbatim"] == 0
            assert summary["over_unlearned"] == 2
            assert all(r.el["4"] < 0.2 for r in result.of("forget"))
            holdout_plain, holdout_now = rows(plain, "holdout"), rows(result, "holdout")
            assert all(holdout_now[k].ma == holdout_plain[k].ma for k in holdout_plain)  # nothing refused there


def test_attacks_run_through_an_input_guard(tiny, tiny_loaded, ids):
    model, tokenizer, runtime = tiny_loaded
    sets = {"forget": tiny["sets"]["forget"], "holdout": tiny["sets"]["holdout"]}
    settings = AttackSettings(attacks=["sampling", "prefix"], samples=2, holdout_control=4,
                              prefix_variations=["short", "lowercase"])
    wrap = lambda inner: guard(inner, parse_decoding("input_filter"), ids["forget"], prefix_tokens=WINDOW)  # noqa: E731
    results = run_attacks(model, tokenizer, sets, SETTINGS.model_copy(update={"el_n": []}), runtime, settings,
                          wrap=wrap)
    # Sampling from the verbatim prefix (P = WINDOW here): every draw is refused from the first suffix token on.
    assert results["sampling"]["forget_extracted"] == 0 and results["sampling"]["holdout_n"] == 4
    # The prompt variations reach the window too, where the filter refuses: nothing comes back.
    assert results["prefix"]["returned_extractable"] == results["prefix"]["returned_verbatim"] == 0
    assert results["prefix"]["variations"]["short"]["forget_mean_ma"] < 0.5


# --- spec, description, command line -----------------------------------------------------------------------


def test_parse_accepts_the_input_guards_and_refuses_the_rest():
    assert parse_decoding("icul") == DecodingSpec("icul", k=2)
    assert parse_decoding("icul:0") == DecodingSpec("icul", k=0)
    assert parse_decoding("guardrail") == DecodingSpec("guardrail")
    assert parse_decoding("guardrail: Say nothing: ever.") == DecodingSpec("guardrail", text="Say nothing: ever.")
    assert parse_decoding("input_filter") == DecodingSpec("input_filter", measure="ngram", tau=0.6)
    assert parse_decoding("input_filter:0.5") == DecodingSpec("input_filter", measure="ngram", tau=0.5)
    assert parse_decoding("input_filter:embed") == DecodingSpec("input_filter", measure="embed", tau=0.99)
    assert parse_decoding("input_filter:embed:0.9") == DecodingSpec("input_filter", measure="embed", tau=0.9)
    for spec in ("icul:3", "guardrail", "guardrail:Be brief.", "input_filter:ngram:0.5", "input_filter:embed:0.9"):
        assert str(parse_decoding(spec)) == spec and parse_decoding(str(parse_decoding(spec))) == parse_decoding(spec)
    for bad in ("icul:", "icul:x", "icul:-1", "icul:1.5", "guardrail:", "guardrail:  ", "input_filter:",
                "input_filter:0", "input_filter:1.01", "input_filter:nan", "input_filter:x", "input_filter:embed:",
                "input_filter:ngram:0.5:3", "ICUL:1", "input-filter"):
        with pytest.raises(InputError) as error:
            parse_decoding(bad)
        assert "--decoding" in str(error.value) and "\n" not in str(error.value)


def test_every_guard_says_the_weights_are_unchanged_and_protect_only_a_deployment():
    for spec in ("dpd:0.5", "filter:4", "icul:2", "guardrail", "input_filter", "input_filter:embed:0.95"):
        info = describe(parse_decoding(spec))
        assert info["weights_changed"] is False and info["note"] == DEPLOYMENT_NOTE and info["explanation"]
        assert info["input_guard"] is (spec.split(":")[0] in ("icul", "guardrail", "input_filter"))
    assert "white-box" in DEPLOYMENT_NOTE and "not the weights" in DEPLOYMENT_NOTE


def test_audit_command_through_icul_with_general_perplexity(tiny, tmp_path):
    forget = tmp_path / "forget.jsonl"
    write_jsonl(forget, tiny["sets"]["forget"][:2])
    out = tmp_path / "icul"
    result = run_cli("audit", "--model", tiny["model"], "--forget", forget, "--holdout", tiny["files"]["holdout"],
                     "--retain", tiny["files"]["retain"], "--general", tiny["files"]["holdout"], "--el-n", "0",
                     "--prefix-tokens", str(WINDOW), "--dtype", "float32", "--device", "cpu", "--decoding", "icul:1",
                     "--out", out)
    assert result.returncode == 0, result.stderr
    written = read_json(out / "audit.json")
    assert written["decoding"]["weights_changed"] is False and written["decoding"]["decoding"] == "icul:1"
    assert written["utility"]["general_ppl"] > 1 and written["utility"]["general_sequences"] == 20
    assert "not the weights" in " ".join(result.stdout.split())


@pytest.mark.parametrize("args, message", [
    (["--decoding", "input_filter:2"], "TAU must be in (0, 1]"),
    (["--decoding", "icul:1"], "needs --retain"),
    (["--decoding", "dpd:2"], "--decoding"),
])
def test_bad_decoding_specs_exit_2_with_one_line(tiny, tmp_path, args, message):
    out = tmp_path / "out"
    result = run_cli("audit", "--model", tiny["model"], "--forget", tiny["files"]["forget"], "--holdout",
                     tiny["files"]["holdout"], *args, "--out", out)
    assert_refused(result, message, out)
