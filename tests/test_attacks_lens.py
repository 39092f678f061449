"""The logit lens attack on the tiny 2-layer model that memorized f0-f3 (repeated 8x); h* were never seen."""

from __future__ import annotations

import copy
import json
import time

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM

from unmemorize.errors import InputError
from unmemorize.evaluate.attacks import AttackSettings, run_attacks
from unmemorize.evaluate.attacks.logit_lens import find_lens, suffix_start
from unmemorize.io.models import make_runtime, state_sha256
from unmemorize.io.tokens import encode, pad
from unmemorize.measure.audit import AuditSettings, audit
from unmemorize.measure.band import EXTRACTABLE, calibrate
from unmemorize.measure.scoring import LeanScores, layer_hits, token_logprobs

AUDIT = AuditSettings(el_n=[])
MEMORIZED = ["f0", "f1", "f2", "f3"]


def lens_attack(model, tokenizer, runtime, sets, **options) -> dict:
    return run_attacks(model, tokenizer, sets, AUDIT, runtime, AttackSettings(attacks=["logit_lens"], **options))[
        "logit_lens"]


def by_id(result: dict) -> dict[str, dict]:
    return {row["id"]: row for row in result["sequences"]}


def test_lens_at_the_last_intermediate_layer_finds_the_memorized_sequences(tiny_loaded, tiny):
    model, tokenizer, runtime = tiny_loaded
    sets = tiny["sets"]
    before = state_sha256(model)
    started = time.perf_counter()
    result = lens_attack(model, tokenizer, runtime, sets)
    print(f"logit_lens on the tiny model: {time.perf_counter() - started:.3f} s (attack {result['seconds']} s)")
    assert result["settings"] == {"layers": [1], "n_layers": 2, "norm": "norm"}
    assert "logit_lens" in AttackSettings().attacks  # run by default
    rows = by_id(result)
    band = result["layers"]["1"]["band"]
    for i in MEMORIZED:
        assert rows[i]["status"] == EXTRACTABLE and rows[i]["layer"] == 1 and rows[i]["extractable_layers"] == [1]
        assert rows[i]["layer_ma"]["1"] == rows[i]["ma"] > band["upper"]
        assert rows[i]["baseline_status"] == EXTRACTABLE and not rows[i]["returned_extractable"]
    assert result["returned_extractable"] == 0  # the model shows them at its output already
    assert result["extractable"] == result["layers"]["1"]["extractable"] >= len(MEMORIZED)
    assert result["layers"]["1"]["forget_mean_ma"] > result["layers"]["1"]["holdout_mean_ma"]
    # One layer: the family-wise band is that layer's, shifted to its upper edge.
    assert result["familywise"]["upper"] == pytest.approx(0, abs=1e-12)
    assert result["holdout_extractable"] == result["holdout_any_layer"] <= 0.1
    assert all(row["excess"] == pytest.approx(row["ma"] - band["upper"]) for row in result["sequences"])

    dumped = json.dumps(result)
    for seq in (s for group in sets.values() for s in group):
        assert seq.text not in dumped
    assert "k0 v" not in dumped  # not even a fragment of a record
    assert state_sha256(model) == before


def test_lens_reads_the_model_s_own_readout(tiny_loaded, tiny):
    """By hand: the last block's output read through the lens is the model's logits (so the audit's MA), and each
    intermediate layer's MA and band are the argmax of head(norm(h_l)) over the audit's positions, one sequence at
    a time (no batching, no padding)."""
    model, tokenizer, runtime = tiny_loaded
    sets = tiny["sets"]
    lens = find_lens(model)
    assert lens.norm is model.model.norm and lens.head is model.lm_head and lens.n_layers == 2
    audit_ma = {r.id: r.ma for r in audit(model, tokenizer, sets, AUDIT, runtime).sequences}
    blocks: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda _m, _i, out: blocks.append(out[0] if isinstance(out, tuple) else out))
             for layer in model.model.layers]
    by_hand = {}
    try:
        with torch.no_grad():
            for name in ("forget", "holdout"):
                for seq, ids in zip(sets[name], encode(tokenizer, sets[name], AUDIT.max_tokens), strict=True):
                    blocks.clear()
                    out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
                    assert torch.equal(out.hidden_states[1], blocks[0])  # intermediate states are before the norm
                    torch.testing.assert_close(lens(blocks[-1]), out.logits, rtol=0, atol=1e-5)
                    targets = torch.tensor(ids[1:])
                    final = (lens(blocks[-1])[0, :-1].argmax(-1) == targets).numpy().mean()
                    assert final == pytest.approx(audit_ma[seq.id], abs=1e-12)
                    by_hand[seq.id] = (lens(blocks[0])[0, :-1].argmax(-1) == targets).numpy().mean()
    finally:
        for hook in hooks:
            hook.remove()

    result = lens_attack(model, tokenizer, runtime, sets)
    for row in result["sequences"]:
        assert row["layer_ma"]["1"] == pytest.approx(by_hand[row["id"]], abs=1e-12)
    band = calibrate(AUDIT.band, [by_hand[s.id] for s in sets["holdout"]])
    assert result["layers"]["1"]["band"] == pytest.approx(band.to_json())


def test_lens_verbatim_uses_the_audit_suffix():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n_tokens, prefix = int(rng.integers(2, 40)), int(rng.integers(1, 40))
        hits = rng.random(n_tokens - 1) < 0.8
        audit_verbatim = LeanScores(hits, np.zeros(n_tokens - 1)).verbatim(prefix)
        assert bool(hits[suffix_start(n_tokens, prefix) :].all()) == audit_verbatim


def test_lens_finds_what_unlearning_hid_in_the_last_layer(tiny_loaded, tiny):
    """Unlearning that changes only the last block leaves layer 1 as it was: the lens reads f0-f3 there."""
    model, tokenizer, runtime = tiny_loaded
    sets = tiny["sets"]
    shallow = copy.deepcopy(model).train()
    batches = {name: pad(encode(tokenizer, sets[name], AUDIT.max_tokens), 0) for name in ("forget", "retain")}

    def nll(name: str) -> torch.Tensor:
        input_ids, mask = batches[name]
        return -(token_logprobs(shallow, input_ids, mask, runtime) * mask[:, 1:]).sum() / mask[:, 1:].sum()

    optimizer = torch.optim.Adam(shallow.model.layers[-1].parameters(), lr=3e-3)
    for _ in range(20):  # gradient ascent on the forget set, descent on the retain set
        loss = nll("retain") - nll("forget")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    shallow.eval()
    hidden = {"f0", "f1", "f3"}
    baseline = audit(shallow, tokenizer, sets, AUDIT, runtime)
    assert all(r.status != EXTRACTABLE and not r.verbatim for r in baseline.of("forget") if r.id in hidden)
    before = state_sha256(shallow)

    result = lens_attack(shallow, tokenizer, runtime, sets)
    rows = by_id(result)
    assert all(rows[i]["returned_extractable"] and rows[i]["layer"] == 1 for i in hidden)
    assert result["returned_extractable"] == result["layers"]["1"]["returned_extractable"] >= len(hidden)
    assert result["returned_verbatim"] == 0
    # Layer 1 is untouched: the lens reads there what it reads in the original model.
    original = by_id(lens_attack(model, tokenizer, runtime, sets))
    assert all(rows[i]["layer_ma"] == original[i]["layer_ma"] for i in rows)
    assert state_sha256(shallow) == before


def test_lens_finds_the_final_norm_of_other_architectures():
    models = {"ln_f": GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=3, n_head=2,
                                                         bos_token_id=0, eos_token_id=0)),
              "decoder.final_layer_norm": OPTForCausalLM(OPTConfig(
                  vocab_size=50, hidden_size=16, num_hidden_layers=3, ffn_dim=32, num_attention_heads=2,
                  max_position_embeddings=16, word_embed_proj_dim=16))}
    input_ids = torch.tensor([[3, 7, 11, 5, 9]])
    for name, model in models.items():
        model.eval()
        lens = find_lens(model)
        assert lens.norm_name == name and lens.n_layers == 3
        pre_norm, logits = norm_input_and_logits(model, lens.norm, input_ids)
        torch.testing.assert_close(lens(pre_norm), logits, rtol=0, atol=1e-5)
        hits = layer_hits(lens.base, [input_ids[0].tolist()], [1, 2], lens, make_runtime("cpu", "float32"))
        assert hits[0].shape == (2, 4)


@torch.no_grad()
def norm_input_and_logits(model, norm: torch.nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(what the final norm received, the logits) of one forward pass."""
    seen: list[torch.Tensor] = []
    hook = norm.register_forward_hook(lambda _module, inputs, _output: seen.append(inputs[0]))
    try:
        logits = model(input_ids=input_ids).logits
    finally:
        hook.remove()
    return seen[0], logits


def test_lens_refuses_bad_layers_and_models_without_a_final_norm(tiny_loaded, tiny):
    model, tokenizer, runtime = tiny_loaded
    for layers in ([0], [2]):
        with pytest.raises(InputError, match=r"layer \d out of range; the model has intermediate layers 1\.\.1"):
            lens_attack(model, tokenizer, runtime, tiny["sets"], lens_layers=layers)
    renamed = copy.deepcopy(model)
    renamed.model.final = renamed.model.norm
    del renamed.model.norm
    with pytest.raises(InputError, match=r"cannot tell the final norm of LlamaForCausalLM .*: none\)"):
        find_lens(renamed)
