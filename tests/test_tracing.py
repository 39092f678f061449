"""Causal tracing (measure.tracing) and locate-then-unlearn (`--localize causal:K`, unlearning.localize)."""

from __future__ import annotations

import copy
import json
from functools import cache

import numpy as np
import pytest
import torch
from clirun import run_cli
from transformers import LlamaConfig, LlamaForCausalLM

from unmemorize.errors import InputError
from unmemorize.io.models import load_model, make_runtime
from unmemorize.io.sets import Sequence
from unmemorize.measure.scoring import score_tokens
from unmemorize.measure.tracing import causal_trace, decoder_layers, prefix_noise
from unmemorize.runs.config import UnlearnSettings
from unmemorize.runs.run import unlearn
from unmemorize.unlearning.context import Context, TokenSets
from unmemorize.unlearning.localize import LOCALIZATION
from unmemorize.unlearning.train import finetune
from unmemorize.unlearning.weights import trainable

RUNTIME = make_runtime("cpu", "float32")
PREFIX = 8
VOCAB = 64


@cache
def one_mlp_memorizer(layer: int, layers: int = 4, seed: int = 0) -> tuple[LlamaForCausalLM, list[list[int]]]:
    """A random tiny Llama that memorizes four random 16-token sequences with only `layer`'s MLP trained: every
    other weight stays at its random initialization, so the memory can only be in that MLP. (The unembedding is
    scaled up so that a trained MLP can make the predictions confident.)"""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    model.requires_grad_(False)
    decoder_layers(model)[layer].mlp.requires_grad_(True)
    generator = torch.Generator().manual_seed(seed + 1)
    sequences = torch.randint(1, VOCAB, (4, 16), generator=generator).tolist()
    finetune(model, sequences, epochs=60, lr=2e-2, batch_size=4, seed=seed, runtime=RUNTIME, pad_id=0,
             description="one-MLP memorizer")
    return model, sequences


@pytest.mark.parametrize("layer", [0, 1, 2, 3])
def test_tracing_ranks_first_the_layer_whose_mlp_stores_the_sequences(layer):
    model, sequences = one_mlp_memorizer(layer)
    assert all(s.ma == 1.0 for s in score_tokens(model, sequences, RUNTIME))  # memorized
    tracing = causal_trace(model, sequences, PREFIX, RUNTIME)
    assert tracing.clean.mean() > tracing.corrupted.mean() + 0.1  # the noised prefix costs the continuation
    assert tracing.ranking()[0] == layer
    others = np.delete(tracing.mean_effects, layer)
    assert tracing.mean_effects[layer] > 5 * max(others.max(), 0.005)
    # the MLP that stores them restores most of what the noise took away
    assert tracing.mean_effects[layer] > 0.3 * (tracing.clean.mean() - tracing.corrupted.mean())


def continuation_probability(logits: torch.Tensor, ids: list[int], prefix: int) -> float:
    """mean_{t=P+1..T} p(x_t | x_<t) of one sequence, from its logits (T, vocab)."""
    probs = torch.softmax(logits.float(), -1)
    return float(np.mean([probs[t - 1, ids[t]] for t in range(prefix, len(ids))]))


def clean_run(model, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(every layer's MLP output, the logits) of one sequence."""
    outputs: list[torch.Tensor] = []
    hooks = [block.mlp.register_forward_hook(lambda m, a, out: outputs.append(out)) for block in decoder_layers(model)]
    logits = model(input_ids=x).logits[0]
    for hook in hooks:
        hook.remove()
    return outputs, logits


def test_effects_match_a_hand_computation():
    """The same quantities by another route: the noise added through `inputs_embeds`, the clean MLP output after the
    prefix spliced in by the module's forward, the probabilities read off the logits."""
    model, sequences = one_mlp_memorizer(1)
    sequences = [sequences[0], sequences[1][:11]]  # two lengths: P = 8 and P = min(8, 11 // 2) = 5
    samples, seed = 2, 7
    tracing = causal_trace(model, sequences, PREFIX, RUNTIME, samples=samples, seed=seed)
    embedding = model.get_input_embeddings().weight
    prefixes = [min(PREFIX, len(ids) // 2) for ids in sequences]
    rows = torch.cat([embedding[ids[:p]] for ids, p in zip(sequences, prefixes, strict=True)])
    nu = 3 * float(rows.std())
    assert tracing.noise_std == pytest.approx(nu, rel=1e-6)
    layers = decoder_layers(model)
    with torch.no_grad():
        for i, (ids, p) in enumerate(zip(sequences, prefixes, strict=True)):
            x = torch.tensor([ids])
            clean_outputs, logits = clean_run(model, x)
            clean = continuation_probability(logits, ids, p)
            assert tracing.clean[i] == pytest.approx(clean, abs=1e-5)
            corrupted, effects = 0.0, np.zeros(len(layers))
            for sample in range(samples):
                embeds = model.get_input_embeddings()(x).clone()
                embeds[0, :p] += nu * prefix_noise(seed, i, sample, p, embeds.shape[-1])
                base = continuation_probability(model(inputs_embeds=embeds).logits[0], ids, p)
                corrupted += base / samples
                for layer, block in enumerate(layers):
                    # the MLP acts token by token: its own output on the prefix, the clean one after it
                    block.mlp.forward = lambda h, own=block.mlp.forward, out=clean_outputs[layer], p=p: torch.cat(
                        [own(h)[:, :p], out[:, p:]], dim=1)
                    patched = continuation_probability(model(inputs_embeds=embeds).logits[0], ids, p)
                    del block.mlp.forward
                    effects[layer] += (patched - base) / samples
            assert tracing.corrupted[i] == pytest.approx(corrupted, abs=1e-5)
            np.testing.assert_allclose(tracing.effects[i], effects, atol=1e-5)


def test_tracing_does_not_depend_on_batching_and_is_zero_without_noise(tiny_loaded):
    model, tokenizer, runtime = tiny_loaded
    from tiny import sentences

    ids = [tokenizer(text)["input_ids"] for text in sentences(5, seed=3)]
    batched = causal_trace(model, ids, PREFIX, runtime, samples=2, batch_size=8)
    alone = causal_trace(model, ids, PREFIX, runtime, samples=2, batch_size=1)
    np.testing.assert_allclose(batched.effects, alone.effects, atol=1e-5)
    np.testing.assert_allclose(batched.corrupted, alone.corrupted, atol=1e-5)
    silent = causal_trace(model, ids, PREFIX, runtime, samples=1, noise=0.0)
    np.testing.assert_allclose(silent.corrupted, silent.clean, atol=1e-6)
    np.testing.assert_allclose(silent.effects, 0.0, atol=1e-6)


def test_localize_unlearns_only_the_top_ranked_layers_mlp(tiny, general, tmp_path):
    settings = UnlearnSettings(method="ga", lr=3e-3, stop="steps", max_steps=2, max_utility_drop=10.0,
                               localize="causal:1", target="ma",
                               audit={"el_n": [], "prefix_tokens": PREFIX, "batch_size": 8})
    sets = {k: v for k, v in tiny["sets"].items() if k in ("forget", "holdout", "retain")}
    unlearn(str(tiny["model"]), sets, general, settings, RUNTIME, tmp_path / "out")
    record = json.loads((tmp_path / "out" / LOCALIZATION).read_text())
    top = record["ranking"][0]
    assert record["trained_layers"] == [top] and record["localize"] == "causal:1"
    assert len(record["mean_effect"]) == 2 and [s["id"] for s in record["sequences"]] == [s.id for s in sets["forget"]]
    original, _ = load_model(tiny["model"], RUNTIME)
    unlearned, _ = load_model(tmp_path / "out" / "model", RUNTIME)
    changed = {name for (name, a), b in zip(original.named_parameters(), unlearned.parameters(), strict=True)
               if not torch.equal(a, b)}  # every other weight bit for bit as it was
    assert changed == {f"model.layers.{top}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}, changed
    report = (tmp_path / "out" / "report.html").read_text()
    assert 'id="plot-localization"' in report and f"only the MLPs of layers {top} were unlearned" in report


def trainable_names(tiny_loaded, work, **options) -> set[str]:
    """The names of the parameters `trainable` leaves to train on a copy of the tiny model."""
    from tiny import build_method

    model, tokenizer, runtime = tiny_loaded
    model = copy.deepcopy(model)
    forget = [tokenizer(s.text)["input_ids"] for s in [Sequence("a", "k0 v1 k1 v2 k2 v3 k3 v4 k4 v5")]]
    ctx = Context(model=model, runtime=runtime, pad_id=0, forget_ids=forget)
    settings = UnlearnSettings(**{"method": "ga", "audit": {"prefix_tokens": PREFIX}, **options})
    model, params, _ = trainable(ctx, build_method(settings.method, tokenizer), settings,
                                 TokenSets(forget, ["a"], [], None, []), work)
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_hinge_localizes_by_default_and_none_trains_every_layer(tiny_loaded, tmp_path):
    """hinge's default causal:6 on a 2-layer model: both layers' MLPs, traced and written down; --localize none:
    every weight."""
    names = trainable_names(tiny_loaded, tmp_path / "default", method="hinge")
    assert names == {f"model.layers.{k}.mlp.{p}_proj.weight" for k in (0, 1) for p in ("gate", "up", "down")}
    assert json.loads((tmp_path / "default" / LOCALIZATION).read_text())["trained_layers"] == [0, 1]
    every = trainable_names(tiny_loaded, tmp_path / "none", method="hinge", localize="none")
    assert len(every) == len(list(tiny_loaded[0].parameters())) and not (tmp_path / "none" / LOCALIZATION).exists()


def test_layers_and_mlps_are_found_across_architectures(tiny_loaded, tmp_path, capsys):
    """GPT-2 keeps its blocks in transformer.h, each with an mlp; OPT's blocks hold fc1 and fc2 but no MLP module:
    an explicit --localize is refused, hinge's default falls back to every layer with a note."""
    from tiny import build_method
    from transformers import GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM

    from unmemorize.io import notes
    from unmemorize.measure.tracing import mlp_of, traceable

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=63, n_embd=32, n_layer=3, n_head=2, n_positions=64))
    assert decoder_layers(gpt2) is gpt2.transformer.h and traceable(gpt2)
    assert mlp_of(gpt2.transformer.h[1]) is gpt2.transformer.h[1].mlp
    opt = OPTForCausalLM(OPTConfig(vocab_size=63, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                   num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=32))
    assert len(decoder_layers(opt)) == 2 and not traceable(opt)
    _, tokenizer, runtime = tiny_loaded
    forget = [tokenizer("k0 v1 k1 v2 k2 v3 k3 v4")["input_ids"]]
    tokens = TokenSets(forget, ["a"], [], None, [])

    def trained(**options) -> int:
        settings = UnlearnSettings(method="hinge", audit={"prefix_tokens": PREFIX}, **options)
        ctx = Context(model=copy.deepcopy(opt), runtime=runtime, pad_id=0, forget_ids=forget)
        _, params, _ = trainable(ctx, build_method("hinge", tokenizer), settings, tokens, tmp_path)
        return len(params)

    notes._said.clear()
    assert trained() == len(list(opt.parameters()))
    assert "hinge's default --localize causal:6" in capsys.readouterr().err
    with pytest.raises(InputError, match="--localize causal:1: the model's decoder layers hold no MLP module"):
        trained(localize="causal:1")


def test_localize_with_lora_trains_only_the_adapters_of_those_mlps(tiny_loaded, tmp_path):
    names = trainable_names(tiny_loaded, tmp_path, lora=4, localize="causal:1")
    top = json.loads((tmp_path / LOCALIZATION).read_text())["trained_layers"][0]
    expected = {f"base_model.model.model.layers.{top}.mlp.{p}_proj.lora_{ab}.default.weight"
                for p in ("gate", "up", "down") for ab in "AB"}
    assert names == expected, names


def test_a_resumed_run_keeps_the_layers_it_chose(tiny_loaded, tmp_path):
    (tmp_path / LOCALIZATION).write_text(json.dumps({"trained_layers": [0]}))  # what the interrupted run chose
    names = trainable_names(tiny_loaded, tmp_path, localize="causal:1")
    assert names == {f"model.layers.0.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}


@pytest.mark.parametrize("spec", ["causal", "causal:0", "causal:x", "rome:3", "causal:2:1"])
def test_bad_localize_specs_are_refused(spec):
    with pytest.raises(InputError, match="--localize"):
        UnlearnSettings(localize=spec)
    assert UnlearnSettings(localize="causal:3").localize == "causal:3"
    assert UnlearnSettings(localize="none").localize == "none" and UnlearnSettings(localize="none").localized is None
    # unset: the method's (hinge localizes, ga does not), recorded as what runs
    assert UnlearnSettings().localize == "causal:6" and not UnlearnSettings().localize_given
    assert UnlearnSettings(method="ga").localized is None


def test_bad_localize_on_the_command_line_exits_2_with_one_line(tiny, tmp_path):
    files = tiny["files"]
    result = run_cli("unlearn", "--model", tiny["model"], "--forget", files["forget"], "--holdout", files["holdout"],
                     "--localize", "causal:0", "--out", tmp_path / "out")
    assert result.returncode == 2, result.stderr
    assert "--localize 'causal:0'" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
