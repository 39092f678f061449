"""The ledger of sequential deletion requests (`unlearn --previous RUN`).

Each run folder holds `ledger.json`: every request made so far on this line of models, oldest first, each
with the file its forget set came from and, per sequence, its id and the SHA-256 of its token ids. Never
the text: the forget set is the very data to delete. To check that earlier requests stay forgotten (MUSE's
sustainability), a later run re-reads each earlier forget file and audits the sequences the ledger names,
after checking that their tokens still hash to what was recorded.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError
from ..io.sets import Sequence, load_set
from ..io.tokens import encode, ids_sha256

LEDGER = "ledger.json"


def read_ledger(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / LEDGER
    if not (Path(run_dir) / "run.json").exists():
        raise InputError(f"--previous {run_dir}: not a finished unlearn run folder (no run.json)")
    if not path.exists():
        raise InputError(f"--previous {run_dir}: has no {LEDGER} (made by an older version?)")
    try:
        return json.loads(path.read_text())["requests"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise InputError(f"--previous {run_dir}: {LEDGER} is not a valid ledger") from None


def request_entry(run_dir: Path, forget_source: str | None, forget: list[Sequence], forget_ids: list[list[int]],
                  target_reached: bool) -> dict:
    return {"run": str(Path(run_dir).resolve()), "forget_source": forget_source, "target_reached": target_reached,
            "sequences": [{"id": s.id, "sha256": ids_sha256(ids)} for s, ids in zip(forget, forget_ids, strict=True)]}


def earlier_sequences(requests: list[dict], tokenizer, max_tokens: int) -> list[Sequence]:
    """Every sequence of every earlier request, re-read from its source and checked against its hash.

    Ids become `r<k>:<id>` (k = the request's number) so that requests may reuse ids.
    """
    sequences: list[Sequence] = []
    for number, request in enumerate(requests, start=1):
        source = request.get("forget_source")
        if not source:
            raise InputError(f"request {number} of the ledger has no forget file recorded; its sequences cannot be "
                             "re-audited")
        try:
            loaded = {s.id: s for s in load_set(source)}
        except InputError as error:
            raise InputError(f"request {number} of the ledger: {error}") from None
        for entry in request["sequences"]:
            sequence = loaded.get(entry["id"])
            if sequence is None:
                raise InputError(f"request {number}: sequence {entry['id']!r} is no longer in {source}")
            if ids_sha256(encode(tokenizer, [sequence], max_tokens)[0]) != entry["sha256"]:
                raise InputError(f"request {number}: sequence {entry['id']!r} in {source} changed since it was "
                                 "unlearned (token hash differs)")
            sequences.append(Sequence(f"r{number}:{sequence.id}", sequence.text))
    return sequences


def write_ledger(folder: Path, requests: list[dict]) -> None:
    (Path(folder) / LEDGER).write_text(json.dumps({"requests": requests}, indent=1) + "\n")
