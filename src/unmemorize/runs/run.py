"""An unlearning run, start to finish: audit before, unlearn, audit after, utility, outputs.

The run works in `<out>.partial/` (checkpoints, trajectory) and renames it to `<out>` only when complete,
so `--out` is never half-written; `--resume` continues from the last checkpoint in `<out>.partial/`.
The input model is only read.
"""

from __future__ import annotations

import atexit
import copy
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .._version import __version__
from ..errors import InputError
from ..evaluate.efficiency import TokenCounter, peak_gpu_memory_mb, peak_memory_mb
from ..evaluate.oracle import oracle_report
from ..evaluate.suite import audit_oracle, evaluate_audit, model_utility
from ..io.files import atomic_write_text
from ..io.models import Runtime, load_model, save_checkpoint, state_sha256
from ..io.sets import Sequence, source_of
from ..io.tokens import check_disjoint, encode, pad_id_of
from ..measure.audit import AuditResult, audit
from ..report import render_run_report
from ..report.certificate import build_certificate, tokenizer_fingerprint, write_certificate
from ..unlearning.context import TokenSets
from ..unlearning.session import unlearn_model
from .config import UnlearnSettings
from .ledger import earlier_sequences, read_ledger, request_entry, write_ledger


@dataclass
class RunResult:
    out: Path
    before: AuditResult
    after: AuditResult
    run: dict

    @property
    def target_reached(self) -> bool:
        return self.run["target_reached"]


def work_folder(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def check_out_folder(out: Path, resume: bool) -> Path:
    work = work_folder(out)
    if out.exists():
        raise InputError(f"--out {out}: already exists; choose a new folder (a run never overwrites one)")
    if resume and not work.exists():
        raise InputError(f"--resume: no interrupted run to resume at {work}")
    if work.exists() and not resume:
        raise InputError(f"--out {out}: an interrupted run is in {work}; pass --resume to continue it or remove it")
    return work


def unlearn(model_spec: str, sets: dict[str, list[Sequence]], general: list[Sequence], settings: UnlearnSettings,
            runtime: Runtime, out: Path, *, resume: bool = False, load_options: dict | None = None,
            show_text: bool = False, before: AuditResult | None = None, before_utility: dict | None = None,
            previous: Path | None = None, sources: dict[str, str] | None = None,
            loaded: tuple | None = None, oracle_audit: AuditResult | None = None,
            neighbours: list[Sequence] | None = None) -> RunResult:
    """Unlearn `sets["forget"]` from the model at `model_spec`; write the run folder `out`.

    `before` may hold an audit the caller already made of this model with these sets and settings (the demo
    audits once for several runs); it is checked against the model's hash. `before_utility` likewise holds
    the utility of that same model (used only together with `before`). `previous` is the run this one
    continues (a later deletion request): every sequence of its ledger is audited too, as the set "earlier".
    `sources` names the files the sets came from ("forget", "holdout"): the ledger and the certificate record
    them (paths, never text) so later requests and `verify` can re-read them. `loaded` is (model, tokenizer)
    already loaded from `model_spec` (compare loads it once): the run unlearns a deep copy and never changes it.
    `oracle_audit` is an audit of `--oracle` with these sets and settings (compare audits it once).
    `neighbours` (`--neighbours`) is unseen in-domain text kept as it was: the loop adds neighbour_weight * KL to
    the original model on it; it is not audited, must share no sequence with the forget set or the holdout (the
    holdout only calibrates the band and is never trained on), and `sources["neighbours"]` names its file.
    """
    from accelerate import Accelerator

    if "holdout" not in sets:
        raise InputError("unlearn needs --holdout: the band of 'looks unseen' is calibrated on it")
    if not general:
        raise InputError("unlearn needs general text (--general) for the utility guard's perplexity")
    # First, so that under torchrun / accelerate launch each process is on its own device before the model
    # loads. Every process computes the same thing on its shard; only the main process writes files.
    accelerator = Accelerator(cpu=runtime.device.type == "cpu")
    main = accelerator.is_main_process
    if accelerator.num_processes > 1:
        end_process_group_at_exit()
    out = Path(out)
    work = check_out_folder(out, resume)
    accelerator.wait_for_everyone()  # every process checked the folders before the main one creates them
    started = time.perf_counter()
    phases: dict[str, float] = {}
    torch.manual_seed(settings.seed)
    requests = read_ledger(previous) if previous is not None else []
    if loaded is None:
        model, tokenizer = load_model(model_spec, runtime, **(load_options or {}))
    else:
        model, tokenizer = copy.deepcopy(loaded[0]).to(runtime.device), loaded[1]
    pad_id = pad_id_of(tokenizer)
    max_tokens = settings.audit.max_tokens
    if requests:
        sets = {**sets, "earlier": earlier_sequences(requests, tokenizer, max_tokens)}
    # The loop drives the request and every earlier forgotten sequence: the band moves down as unlearning goes
    # on, so an earlier sequence left at its edge can end up above it again, and per-sequence selection
    # (sga) pushes exactly those. The first `requested` of `tokens.forget` are this request.
    driven = sets["forget"] + sets.get("earlier", [])
    requested = len(sets["forget"])
    tokens = TokenSets(
        forget=encode(tokenizer, driven, max_tokens, "forget"),
        forget_names=[s.id for s in driven],
        holdout=encode(tokenizer, sets["holdout"], max_tokens, "holdout"),
        retain=encode(tokenizer, sets["retain"], max_tokens, "retain") if "retain" in sets else None,
        general=encode(tokenizer, general, max_tokens, "general"),
        neighbours=encode(tokenizer, neighbours, max_tokens, "neighbours") if neighbours else None,
    )
    check_disjoint({"forget": tokens.forget[:requested], "holdout": tokens.holdout, "retain": tokens.retain,
                    "neighbours": tokens.neighbours}, {**sets, "neighbours": neighbours or []})
    # Every audit of this run (before, after, the attacks') uses these ids: the sets are encoded once.
    token_ids = {"forget": tokens.forget[:requested], "earlier": tokens.forget[requested:],
                 "holdout": tokens.holdout, "retain": tokens.retain}
    token_ids = {name: ids for name, ids in token_ids.items() if name in sets}
    settings_json = settings.model_dump(mode="json")
    recorded = work / "settings.json"
    if resume and json.loads(recorded.read_text()) != {"model": model_spec, **settings_json}:
        raise InputError(f"--resume: the settings differ from those of the interrupted run in {work}")

    input_hash = state_sha256(model)
    info = {"source": model_spec, "sha256": input_hash, "runtime": runtime.describe()}
    counter = TokenCounter(model)
    evaluation = settings.evaluation
    utility_ids = {"retain": tokens.retain, "general": tokens.general, "holdout": tokens.holdout}
    tick = time.perf_counter()
    # A caller's audit is reused only if it measured these sets of this model the same way: its rows also stand
    # in for the retain and holdout scoring of the utility.
    if (before is None or before.model.get("sha256") != input_hash or before.settings["el_n"] != settings.audit.el_n
            or before.settings.get("max_tokens") != settings.audit.max_tokens or before.set_names() != list(sets)):
        before, before_utility = audit(model, tokenizer, sets, settings.audit, runtime, model_info=info,
                                       token_ids=token_ids), None
    utility_before = before_utility or model_utility(model, tokenizer, utility_ids, runtime, evaluation,
                                                     settings.audit.batch_size, pad_id, audited=before)
    phases["audit_before"] = time.perf_counter() - tick
    # The oracle is audited up front: a bad --oracle fails before any unlearning, and one audit serves both
    # comparisons (before and after).
    if evaluation.oracle and oracle_audit is None:
        oracle_audit = audit_oracle(evaluation.oracle, sets, settings.audit, runtime, load_options)
    # The work folder appears only now: bad input found while auditing (an unknown --tasks name, ...) leaves
    # nothing behind.
    if main and not resume:
        work.mkdir(parents=True)
        recorded.write_text(json.dumps({"model": model_spec, **settings_json}))
    accelerator.wait_for_everyone()

    tick = time.perf_counter()
    model, outcome, lam = unlearn_model(model, tokenizer, settings, tokens, runtime, work, utility_before, accelerator,
                                        audited_scores(before, ["forget", "earlier"], ["holdout"]))
    phases["unlearn"] = time.perf_counter() - tick

    tick = time.perf_counter()
    info = {"source": str(out / "model"), "sha256": state_sha256(model), "runtime": runtime.describe()}
    after = audit(model, tokenizer, sets, settings.audit, runtime, reference=before, model_info=info,
                  token_ids=token_ids)
    utility_after = model_utility(model, tokenizer, utility_ids, runtime, evaluation, settings.audit.batch_size,
                                  pad_id, audited=after)
    phases["audit_after"] = time.perf_counter() - tick
    tick = time.perf_counter()
    if oracle_audit is not None:
        before.extra["oracle"] = oracle_report(before, oracle_audit)
    # The general text joins the attacks' sets: benign_relearn trains on it when there is no retain set.
    evaluate_audit(after, model, tokenizer, {**sets, "general": general}, settings.audit, runtime,
                   evaluation.attacks, oracle_audit, token_ids={**token_ids, "general": tokens.general},
                   load_options=load_options)
    phases["evaluation"] = time.perf_counter() - tick

    run = {
        "method": settings.method, "out": str(out), "settings": settings_json, "tool_version": __version__,
        "input_model": {"source": model_spec, "sha256": input_hash},
        "steps": outcome.steps, "lambda": lam, "seconds": time.perf_counter() - started, "phase_seconds": phases,
        # tokens: forward = every token through the model (scoring, decoding, training, evaluation);
        # backward = the tokens of the gradient steps (and of the task vector's fine-tuning)
        "tokens": {"forward": counter.close(), "backward": outcome.tokens_trained},
        "peak_memory_mb": peak_memory_mb(), "peak_gpu_memory_mb": peak_gpu_memory_mb(),
        "target": settings.target, "target_reached": reached(after, settings.target),
        "stop_reason": outcome.stop_reason,
        "restored_step": outcome.restored_step,
        "forget": {"extractable_before": before.summary("forget")["extractable"],
                   "extractable_after": after.summary("forget")["extractable"],
                   "verbatim_after": after.summary("forget")["verbatim"],
                   "over_unlearned_after": after.summary("forget")["over_unlearned"],
                   "loss_memorized_before": before.summary("forget")["loss_memorized"],
                   "loss_memorized_after": after.summary("forget")["loss_memorized"],
                   "loss_over_unlearned_after": after.summary("forget")["loss_over_unlearned"]},
        "utility": {"before": utility_before, "after": utility_after},
        "sets": set_files(sets, neighbours, sources),
    }
    if requests:  # did the earlier requests stay forgotten? (MUSE's sustainability)
        keys = ("n", "mean_ma", "extractable", "verbatim", "over_unlearned", "loss_memorized", "loss_over_unlearned")
        was, now = before.summary("earlier"), after.summary("earlier")
        run["previous"] = str(previous)
        run["earlier"] = {"requests": len(requests), "before": {k: was[k] for k in keys},
                          "after": {k: now[k] for k in keys},
                          "stayed_forgotten": now["extractable"] == 0 and now["verbatim"] == 0}
    tick = time.perf_counter()
    if main:
        save_checkpoint(model, tokenizer, work / "model")
        before.write(work, "before", show_text)
        after.write(work, "after", show_text)
        run["phase_seconds"]["save"] = time.perf_counter() - tick
        atomic_write_text(work / "run.json", json.dumps(run, indent=1) + "\n")
        write_ledger(work, [*requests, request_entry(out, (sources or {}).get("forget"), sets["forget"],
                                                     tokens.forget[:requested], run["target_reached"])])
        certificate = build_certificate(run, before, after, tokens.forget[:requested], tokens.forget_names[:requested],
                                        tokenizer_fingerprint(tokenizer), holdout_ids=tokens.holdout,
                                        holdout_names=[s.id for s in sets["holdout"]], sources=sources)
        write_certificate(work, certificate)
        render_run_report(work, show_text)
        shutil.rmtree(work / "checkpoint", ignore_errors=True)
        work.rename(out)
    accelerator.wait_for_everyone()  # no process returns before the run folder is complete
    _process_group["finished"] = True
    return RunResult(out, before, after, run)


def set_files(sets: dict[str, list[Sequence]], neighbours: list[Sequence] | None,
              sources: dict[str, str] | None) -> dict[str, str | None]:
    """Which file served which purpose (paths, never text): forget (deleted), band (the holdout, which
    calibrates the band and is never trained on), retain (kept by the retain regularizer), neighbours (unseen
    in-domain text kept by KL). None where a set was not given; the set's own source when `sources` lacks it."""
    given = {**sets, "neighbours": neighbours}
    purposes = {"forget": "forget", "band": "holdout", "retain": "retain", "neighbours": "neighbours"}
    return {purpose: (sources or {}).get(name) or ((source_of(given[name], "") or None) if given.get(name) else None)
            for purpose, name in purposes.items()}


def audited_scores(audited: AuditResult, forget: list[str], holdout: list[str]) -> dict[str, list]:
    """The per-token scores an audit kept of its rows ({"forget": the rows of the sets `forget` in order,
    "holdout": ...}); empty when some row has none."""
    scores = {"forget": [r.scores for name in forget for r in audited.of(name)],
              "holdout": [r.scores for name in holdout for r in audited.of(name)]}
    return scores if all(s is not None for rows in scores.values() for s in rows) else {}


def reached(after: AuditResult, target: str = "ma") -> bool:
    """SPEC's `target` (ma or indistinguishable) on the request, and with earlier requests, on theirs too (the
    loop drives them with the request): none extractable or verbatim again, and under `indistinguishable` every
    loss in the loss band."""
    if "earlier" not in after.set_names():
        return after.reached(target)
    return after.reached(target) and after.reached(target, "earlier")


_process_group = {"registered": False, "finished": False}


def end_process_group_at_exit() -> None:
    """Destroy the torch.distributed process group before the interpreter shuts down: left to interpreter
    teardown, gloo sometimes aborts the process at exit. Registered once; later runs in the same process
    (compare) reuse the group."""
    _process_group["finished"] = False
    if not _process_group["registered"]:
        atexit.register(destroy_process_group)
        _process_group["registered"] = True


def destroy_process_group() -> None:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if _process_group["finished"]:
        # After a complete run, leave together: torchrun stops the other processes as soon as one exits
        # non-zero (exit 3, target not reached), so a process that lags behind would be killed. Not after a
        # failure: the other processes may be inside another collective.
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


__all__ = ["RunResult", "unlearn"]
