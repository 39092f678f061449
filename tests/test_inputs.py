"""Inputs as users send them: a model with a short context, files written on Windows, a hub that cannot be
reached, sets that contradict each other, `--version`. Every bad input is one line on stderr and exit 2, with
nothing written."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
from clirun import run_cli
from tiny import SPECIAL, WORDS, make_tokenizer, tiny_sets
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig

from unmemorize._version import __version__
from unmemorize.errors import InputError
from unmemorize.io import hub
from unmemorize.io.corpus import open_corpus
from unmemorize.io.models import context_length, load_model, make_runtime, save_checkpoint
from unmemorize.io.sets import Sequence, SequenceSet, load_set, write_jsonl
from unmemorize.io.tokens import check_disjoint, encode, set_context_length, token_limit
from unmemorize.measure.extraction import greedy_continue

CONTEXT = 16  # tokens; the tiny records are 16-24 tokens long
FLOAT32 = ["--device", "cpu", "--dtype", "float32"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
NOTE = f"--max-tokens 256 is longer than the model's context ({CONTEXT} tokens); sequences are truncated to {CONTEXT}"


def short_context_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """GPT-2 style: learned position embeddings for 16 positions, so position 16 is an IndexError."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(SPECIAL) + len(WORDS), n_positions=CONTEXT, n_embd=32, n_layer=1, n_head=2,
                        pad_token_id=0, eos_token_id=2, bos_token_id=2)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def short(tmp_path_factory) -> dict:
    """A (random) GPT-2 with a 16-token context saved as a model folder, and the tiny sets as JSONL files."""
    root = tmp_path_factory.mktemp("short-context")
    save_checkpoint(short_context_gpt2(), make_tokenizer(), root / "model")
    files = {}
    for name, sequences in tiny_sets().items():
        files[name] = root / f"{name}.jsonl"
        write_jsonl(files[name], sequences)
    return {"model": root / "model", "files": files, "sets": tiny_sets()}


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def test_save_checkpoint_replaces_a_folder_only_when_asked(tmp_path):
    """A cache entry another process finished first stays as it is (replace=False); otherwise it is replaced."""
    dest = tmp_path / "model"
    save_checkpoint(short_context_gpt2(seed=0), make_tokenizer(), dest)
    first = (dest / "model.safetensors").read_bytes()
    save_checkpoint(short_context_gpt2(seed=1), make_tokenizer(), dest, replace=False)
    assert (dest / "model.safetensors").read_bytes() == first
    save_checkpoint(short_context_gpt2(seed=1), make_tokenizer(), dest)
    assert (dest / "model.safetensors").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folder left behind


# --- context length -------------------------------------------------------------------------------------------


def test_context_length_comes_from_the_config():
    assert context_length(GPT2Config(n_positions=CONTEXT)) == CONTEXT
    assert context_length(LlamaConfig(max_position_embeddings=128)) == 128

    class NoLimit:  # e.g. a recurrent model: no position limit
        pass

    assert context_length(NoLimit()) is None


def test_load_model_records_the_context_on_the_tokenizer(short):
    _, tokenizer = load_model(short["model"], make_runtime("cpu", "float32"))
    assert token_limit(tokenizer, 256) == CONTEXT and token_limit(tokenizer, 8) == 8


def test_encode_truncates_to_the_shorter_of_max_tokens_and_the_context():
    tokenizer = make_tokenizer()
    sequences = tiny_sets()["forget"]
    assert max(len(ids) for ids in encode(tokenizer, sequences, 256)) > CONTEXT  # no context known: max_tokens
    set_context_length(tokenizer, CONTEXT)
    clamped = encode(tokenizer, sequences, 256)
    assert clamped == [list(ids) for ids in tokenizer([s.text for s in sequences], truncation=True,
                                                       max_length=CONTEXT)["input_ids"]]
    assert max(len(ids) for ids in encode(tokenizer, sequences, 8)) == 8


def test_greedy_decoding_of_a_batch_stays_within_the_context():
    """Rows needing fewer tokens step on with the batch: their positions must not run past the context."""
    model = short_context_gpt2()
    runtime = make_runtime("cpu", "float32")
    prompts = [[3, 4], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]
    outputs = greedy_continue(model, prompts, [13, 5], runtime, batch_size=2, pad_id=0)
    assert [len(o) for o in outputs] == [13, 5]
    alone = greedy_continue(model, prompts[1:], [5], runtime, batch_size=1, pad_id=0)
    assert outputs[1] == alone[0]


def test_unlearn_on_a_short_context_model_truncates_and_says_so_once(short, tmp_path):
    files, out = short["files"], tmp_path / "run"
    result = run_cli("unlearn", "--model", short["model"], "--forget", files["forget"], "--holdout",
                     files["holdout"], "--retain", files["retain"], "--out", out, "--max-steps", "1", "--el-n", "3",
                     "--prefix-tokens", "4", *FLOAT32, env=ONE_THREAD)
    assert result.returncode in (0, 3), result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("note:") == 1 and NOTE in result.stderr, result.stderr
    after = json.loads((out / "after.json").read_text())
    assert max(row["n_tokens"] for row in after["sequences"]) == CONTEXT


def test_attack_prompts_stay_within_a_short_context(short, tmp_path):
    """The prefix attack primes a record with another whole record: the prompt gives up its first tokens."""
    files = short["files"]
    result = run_cli("attack", "--model", short["model"], "--forget", files["forget"], "--holdout", files["holdout"],
                     "--retain", files["retain"], "--out", tmp_path / "attack", "--attacks", "prefix,sampling",
                     "--samples", "2", "--prefix-tokens", "4", *FLOAT32, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("note:") == 1 and NOTE in result.stderr, result.stderr
    assert (tmp_path / "attack" / "attack.json").exists()


# --- files written on Windows, read by scan -------------------------------------------------------------------


@pytest.mark.parametrize(("name", "content", "ids"), [
    ("c.jsonl", '{"id": "a", "text": "k0 v1 k1 v2"}\r\n{"text": "k0 v3"}\r\n', ["a", "2"]),
    ("c.csv", 'id,text\r\na,"k0 v1,\r\nk1 v2"\r\nb,k0 v3\r\n', ["a", "b"]),
    ("c.txt", "k0 v1 k1 v2\r\nk0 v3\r\n", ["1", "2"]),
], ids=["jsonl", "csv", "txt"])
def test_a_corpus_with_a_byte_order_mark_streams_like_one_without(tmp_path, name, content, ids):
    (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + content.encode())
    corpus = open_corpus(str(tmp_path / name))
    documents = [corpus.document(k, record) for k, record in enumerate(corpus.records())]
    assert [d.id for d in documents] == ids
    assert not any("\ufeff" in d.text or d.text.endswith("\r") for d in documents)
    assert documents[0].text.startswith("k0 v1")


# --- a hub that cannot be reached -----------------------------------------------------------------------------


@pytest.fixture
def no_hub(tmp_path) -> dict:
    """The environment of a machine where the hub cannot be reached (a local port nothing listens on) and whose
    caches are empty."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return {"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HUB_CACHE": str(tmp_path / "hub-cache"),
            "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache"), "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0",
            **ONE_THREAD}


@pytest.mark.parametrize(("args", "named"), [
    (["--model", "{model}", "--forget", "hf:someone/nothing"], "hf:someone/nothing"),
    (["--model", "someone/no-model", "--forget", "{forget}"], "model someone/no-model"),
], ids=["set", "model"])
def test_an_unreachable_hub_is_one_line_at_once(tiny, no_hub, tmp_path, args, named):
    paths = {"model": tiny["model"], "forget": tiny["files"]["forget"]}
    out = tmp_path / "out"
    result = run_cli("audit", *[a.format(**paths) for a in args], "--out", out, env=no_hub)
    assert result.returncode == 2
    assert len(error_lines(result)) == 1, result.stderr
    assert named in result.stderr and "cannot be reached" in result.stderr, result.stderr
    assert not out.exists()


def test_an_unreachable_hub_corpus_is_one_line(tiny, no_hub, tmp_path):
    result = run_cli("scan", "--model", tiny["model"], "--corpus", "hf:someone/nothing:train", "--out",
                     tmp_path / "scan", env=no_hub)
    assert result.returncode == 2
    assert len(error_lines(result)) == 1 and "hf:someone/nothing:train" in result.stderr, result.stderr
    assert "cannot be reached" in result.stderr
    assert not (tmp_path / "scan").exists()


def test_a_cached_hub_model_loads_without_the_hub(short, no_hub, tmp_path):
    """A model in the hub cache (as a download leaves it) loads although the hub cannot be reached."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = Path(no_hub["HF_HUB_CACHE"]) / "models--someone--short"
    shutil.copytree(short["model"], repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    result = run_cli("audit", "--model", "someone/short", "--forget", short["files"]["forget"], "--el-n", "0",
                     "--max-tokens", "8", "--out", tmp_path / "out", *FLOAT32, env=no_hub)
    assert result.returncode == 0, result.stderr
    assert "someone/short was loaded from the local cache" in result.stderr, result.stderr
    assert "Retry" not in result.stderr
    assert (tmp_path / "out" / "audit.json").exists()


def test_a_cached_hub_dataset_loads_without_the_hub(no_hub, tmp_path, monkeypatch):
    """A dataset in the datasets cache (as a download leaves it) loads although the hub cannot be reached."""
    import datasets
    from huggingface_hub import constants

    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"text": "alpha"}\n{"text": "beta"}\n')
    cache = tmp_path / "datasets-cache"
    datasets.load_dataset(str(folder), split="train", cache_dir=str(cache))
    shutil.copytree(cache / "tiny", cache / "someone___tiny")  # the cache entry a download of someone/tiny leaves
    monkeypatch.setattr(constants, "ENDPOINT", no_hub["HF_ENDPOINT"])
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(hub, "_reachable", {})
    assert [(s.id, s.text) for s in load_set("hf:someone/tiny:train")] == [("1", "alpha"), ("2", "beta")]
    assert constants.HF_HUB_OFFLINE is False  # offline mode only for the load
    corpus = open_corpus("hf:someone/tiny:train")  # scan streams it from the cache
    assert [corpus.document(k, r).text for k, r in enumerate(corpus.records())] == ["alpha", "beta"]
    with pytest.raises(InputError, match=r"^hf:someone/other: cannot load dataset: the Hugging Face Hub .* cannot "
                                         r"be reached and no copy is in the local cache$"):
        load_set("hf:someone/other")


# --- sets that contradict each other --------------------------------------------------------------------------


def named_set(source: str, sequences: list[Sequence]) -> SequenceSet:
    """A set as load_set returns it: it knows the file it came from."""
    result = SequenceSet(sequences)
    result.source = source
    return result


def test_check_disjoint_compares_token_ids_after_truncation():
    tokenizer = make_tokenizer()
    forget = named_set("f.jsonl", [Sequence("f0", "k0 v1 k1 v2 k2 v3"), Sequence("f1", "k0 v4 k1 v5")])
    # h1 differs from f0 only after the 4th token: the same sequence once truncated to 4 tokens
    holdout = named_set("h.jsonl", [Sequence("h0", "k0 v9 k1 v9"), Sequence("h1", "k0 v1 k1 v2 k2 v7")])
    retain = named_set("r.jsonl", [Sequence("r0", "k0 v4 k1 v5"), Sequence("r1", "k0 v4 k1 v5")])
    sets = {"forget": forget, "holdout": holdout, "retain": retain, "general": forget, "earlier": forget}
    ids = {name: encode(tokenizer, seqs, 4) for name, seqs in sets.items()}
    with pytest.raises(InputError) as caught:
        check_disjoint(ids, sets)
    message = str(caught.value)
    assert "--holdout h.jsonl shares 1 sequence(s) with --forget f.jsonl" in message
    assert "id 'h1' is forget id 'f0'" in message
    assert "--retain r.jsonl shares 2 sequence(s) with --forget f.jsonl" in message
    assert "\n" not in message
    # general text and earlier requests may share sequences with the request; untruncated, h1 is a new sequence
    check_disjoint({name: encode(tokenizer, sets[name], 256) for name in ("forget", "holdout", "general",
                                                                            "earlier")}, sets)
    check_disjoint({"forget": ids["forget"], "holdout": ids["holdout"][:1], "retain": None}, sets)


def test_audit_refuses_a_holdout_that_is_the_forget_set(tiny, tmp_path):
    forget, out = tiny["files"]["forget"], tmp_path / "out"
    result = run_cli("audit", "--model", tiny["model"], "--forget", forget, "--holdout", forget, "--out", out,
                     *FLOAT32, env=ONE_THREAD)
    assert result.returncode == 2
    assert len(error_lines(result)) == 1, result.stderr
    assert f"--holdout {forget} shares 8 sequence(s) with --forget {forget}" in result.stderr
    assert not out.exists()


def test_unlearn_refuses_a_retain_set_holding_forget_sequences(tiny, tmp_path):
    sets = tiny["sets"]
    retain = tmp_path / "retain.jsonl"
    write_jsonl(retain, [*sets["retain"], *[Sequence(f"copy{s.id}", s.text) for s in sets["forget"][:2]]])
    out = tmp_path / "run"
    result = run_cli("unlearn", "--model", tiny["model"], "--forget", tiny["files"]["forget"], "--holdout",
                     tiny["files"]["holdout"], "--retain", retain, "--out", out, *FLOAT32, env=ONE_THREAD)
    assert result.returncode == 2
    assert len(error_lines(result)) == 1, result.stderr
    assert f"--retain {retain} shares 2 sequence(s) with --forget {tiny['files']['forget']}" in result.stderr
    assert not out.exists() and not out.with_name("run.partial").exists()


# --- --version ------------------------------------------------------------------------------------------------


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout == f"unmemorize {__version__}\n" and __version__ == "0.1.0"
