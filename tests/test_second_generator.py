"""The second record generator ("clinical" visit notes): deterministic, the default's set sizes, disjoint sets.

No model: only `demo_data`. The default generator's sets are pinned by tests/test_embedded.py (their hash)."""

from __future__ import annotations

import re

import pytest

from unmemorize.errors import InputError
from unmemorize.runs import embedded


@pytest.fixture(scope="module")
def clinical():
    return embedded.demo_data(0, generator="clinical")


@pytest.fixture(scope="module")
def default():
    return embedded.demo_data(0)


PERSON = r"([A-Z][\w'-]+ [A-Z][\w'-]+)"


def patient(text: str) -> str:
    """The patient's name in a clinical record (each template names it once, in its own place)."""
    for pattern in (r"^Visit note: " + PERSON + ",", r"^Patient " + PERSON + r" \(", r"Patient: ([^.]+)\.",
                    r"^Clinic message from " + PERSON + r" \(", "^" + PERSON + ", born on"):
        found = re.search(pattern, text)
        if found:
            return found.group(1)
    raise AssertionError(f"no patient in {text!r}")


def test_clinical_is_deterministic(clinical):
    assert embedded.demo_data(0, generator="clinical") == clinical
    other = embedded.demo_data(1, generator="clinical")
    assert [s.text for s in other.holdout] != [s.text for s in clinical.holdout]


def test_clinical_has_the_default_set_sizes(clinical, default):
    for name in ("forget", "retain", "holdout", "general", "general_train", "neighbours"):
        assert len(getattr(clinical, name)) == len(getattr(default, name)), name
    assert sorted(clinical.repetitions.values()) == sorted(default.repetitions.values())
    assert [s.id for s in clinical.forget + clinical.retain + clinical.holdout + clinical.neighbours] == \
        [s.id for s in default.forget + default.retain + default.holdout + default.neighbours]
    # the general text does not depend on the records' generator
    assert clinical.general == default.general
    assert clinical.general_train == default.general_train


def test_clinical_records_are_visit_notes(clinical):
    records = clinical.forget + clinical.retain + clinical.holdout + clinical.neighbours
    assert all(re.search(r"MRN-\d{7}|Dr\. ", s.text) for s in records)
    assert sum("MRN-" in s.text for s in records) >= len(records) // 2
    assert all(any(d in s.text for d in embedded.DIAGNOSES) for s in records)
    # every template is used, and none of the customer records' wording
    assert {s.text.split()[0] for s in records} >= {"Visit", "Patient", "Discharge", "Clinic"}
    assert not any(s.text.startswith(("Customer record", "Account holder", "KYC file", "Support ticket"))
                   for s in records)


def test_no_patient_or_text_shared_across_sets(clinical):
    training = [patient(s.text) for s in clinical.forget + clinical.retain]
    holdout = [patient(s.text) for s in clinical.holdout]
    neighbours = [patient(s.text) for s in clinical.neighbours]
    every = training + holdout + neighbours
    assert len(every) == len(set(every))  # one person, one record, in one set
    sets = [clinical.forget, clinical.retain, clinical.holdout, clinical.neighbours, clinical.general,
            clinical.general_train]
    texts = [s.text for seqs in sets for s in seqs]
    assert len(texts) == len(set(texts))
    ids = [s.id for seqs in sets for s in seqs]
    assert len(ids) == len(set(ids))


def test_unknown_generator_is_one_clear_line():
    with pytest.raises(InputError) as caught:
        embedded.demo_data(0, generator="invoices")
    message = str(caught.value)
    assert "\n" not in message
    assert "'invoices'" in message and "customers" in message and "clinical" in message


def test_default_generator_is_the_customers_one(default):
    assert embedded.demo_data(0, generator="customers") == default
    assert not any("MRN-" in s.text for s in default.forget + default.retain + default.holdout)


def test_recipe_without_generator_keeps_the_shipped_hash():
    # the shipped victim's recipe has no "generator" key: adding one would change its hash (and its folder)
    assert "generator" not in embedded.RECIPE
    assert embedded.recipe_hash({**embedded.RECIPE, "generator": "clinical", "oracle": False}) != \
        embedded.recipe_hash({**embedded.RECIPE, "oracle": False})
