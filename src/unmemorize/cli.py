"""The `unmemorize` command line. Each command assembles its pieces and calls the Python API."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .errors import InputError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Find memorized training sequences, unlearn them one by one, prove it.")
# Piped or logged output gets a fixed, wide layout instead of Rich's 80-column fallback.
console = Console(width=None if sys.stdout.isatty() else 140)

# Options shared by several commands (SPEC "Command line").
Model = Annotated[str, typer.Option("--model", help="HF folder, hub id or .gguf file.")]
Forget = Annotated[str, typer.Option("--forget", help="Sequences to unlearn (JSONL, CSV, Parquet, .txt, hf:NAME).")]
Holdout = Annotated[str | None, typer.Option("--holdout", help="Unseen sequences of the same kind: the band.")]
Retain = Annotated[str | None, typer.Option("--retain", help="Training sequences that must stay as they are.")]
Out = Annotated[Path | None, typer.Option("--out", help="Output folder.")]
Device = Annotated[str, typer.Option("--device", help="auto | cpu | cuda")]
Dtype = Annotated[str, typer.Option("--dtype", help="auto (bf16 autocast where fast) | float32 | bfloat16")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Sequences per forward pass.")]
Seed = Annotated[int, typer.Option("--seed")]
MaxTokens = Annotated[int, typer.Option("--max-tokens", help="Truncate sequences to this many tokens.")]
PrefixTokens = Annotated[int, typer.Option("--prefix-tokens", help="Prefix length for `verbatim`.")]
ElN = Annotated[str, typer.Option("--el-n", help="n of EL_n, comma-separated; 0 turns EL off.")]
ElSets = Annotated[str, typer.Option("--el-sets", help="Sets that get EL, comma-separated, or 'all'.")]
BandRule = Annotated[str, typer.Option("--band", help="quantile:LO,HI | meanstd:K | mean")]
ShowText = Annotated[bool, typer.Option("--show-text", help="Show sequence text (off: ids and hashes only).")]
AllowPickle = Annotated[bool, typer.Option("--allow-pickle", help="Allow pickle weights (trusted sources only).")]
TrustRemoteCode = Annotated[bool, typer.Option("--trust-remote-code", help="Run the model repo's own code.")]
Oracle = Annotated[str | None, typer.Option("--oracle", help="A model trained without the forget set: forget "
                                            "quality, privleak, its own statuses.")]
Decoding = Annotated[str | None, typer.Option("--decoding", help="Measure through a guard that leaves the weights "
                                              "unchanged: decoding-time dpd:LAMBDA | filter:N, or input-side "
                                              "icul:K | guardrail[:TEXT] | input_filter[:ngram|embed][:TAU] "
                                              "(docs/concepts.md)")]
Tasks = Annotated[str | None, typer.Option("--tasks", help="lm-evaluation-harness tasks, comma-separated "
                                           "(unmemorize_pyfacts ships offline).")]


def parse_el_n(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"--el-n {text!r}: expected comma-separated integers") from None
    if any(v < 0 for v in values):
        raise InputError(f"--el-n {text!r}: values must be >= 0")
    return [] if values == [0] else [v for v in values if v]


def parse_el_sets(text: str | list | None) -> list[str] | None:
    if text is None or isinstance(text, list):
        return text
    names = [name.strip() for name in text.split(",") if name.strip()]
    return None if names == ["all"] else names


def audit_settings(max_tokens: int, prefix_tokens: int, el_n: str, band: str, batch_size: int, seed: int,
                   el_sets: str = "forget,earlier"):
    from pydantic import ValidationError

    from .measure.audit import AuditSettings

    try:
        return AuditSettings(max_tokens=max_tokens, prefix_tokens=prefix_tokens, el_n=parse_el_n(el_n), band=band,
                             batch_size=batch_size, seed=seed, el_sets=parse_el_sets(el_sets))
    except ValidationError as error:
        first = error.errors()[0]
        raise InputError(f"--{str(first['loc'][0]).replace('_', '-')}: {first['msg']}") from None


def load_sets(**sources: str | None) -> dict:
    """Load every given set before any model work, so bad input fails fast and writes nothing."""
    from .io.sets import load_set

    return {name: load_set(source) for name, source in sources.items() if source is not None}


def check_out(out: Path | None) -> None:
    if out is not None and out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")


@app.command()
def audit(model: Model, forget: Forget, holdout: Holdout = None, retain: Retain = None, out: Out = None,
          device: Device = "auto", dtype: Dtype = "auto", batch_size: BatchSize = 8, seed: Seed = 0,
          max_tokens: MaxTokens = 256, prefix_tokens: PrefixTokens = 32, el_n: ElN = "10",
          el_sets: ElSets = "forget,earlier",
          band: BandRule = "quantile:0.05,0.95", show_text: ShowText = False, allow_pickle: AllowPickle = False,
          trust_remote_code: TrustRemoteCode = False, oracle: Oracle = None, decoding: Decoding = None,
          general: Annotated[str | None, typer.Option("--general", help="General text: its perplexity under the "
                                                      "measured model (through --decoding's guard) goes to "
                                                      "audit.json's utility.")] = None) -> None:
    """Per-sequence measures, the band, statuses and privacy AUCs; writes audit.json and audit.csv. Data parallel
    under torchrun."""
    import contextlib
    import os

    from .evaluate.suite import audit_oracle, evaluate_audit
    from .io.models import make_runtime
    from .measure.audit import audit as run_audit
    from .report.terminal import print_audit, print_guard, print_oracle

    settings = audit_settings(max_tokens, prefix_tokens, el_n, band, batch_size, seed, el_sets)
    check_out(out)
    decoding_spec = parse_decoding_option(decoding)
    sets = load_sets(forget=forget, holdout=holdout, retain=retain)
    general_set = load_general(general) if general is not None else None
    if oracle is not None and "holdout" not in sets:
        raise InputError("--oracle needs --holdout: the comparison uses both sets' statuses and AUCs")
    runtime = make_runtime(device, dtype)
    rank, world = 0, 1
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: data parallel, every process measures a share
        from .runs.scan import join_processes

        rank, world = join_processes(runtime)
    load_options = {"allow_pickle": allow_pickle, "trust_remote_code": trust_remote_code}
    lm, tokenizer, info, wrap = load_measured_model(model, runtime, load_options, decoding_spec, sets, settings)
    with console.status("measuring every sequence") if rank == 0 else contextlib.nullcontext():
        measured = wrap(lm) if wrap else lm
        result = run_audit(measured, tokenizer, sets, settings, runtime, model_info=info,
                           shard=(rank, world) if world > 1 else None)
        if decoding_spec is not None:
            result.extra["decoding"] = info["decoding"]
        oracle_audit = audit_oracle(oracle, sets, settings, runtime, load_options) if oracle else None
        evaluate_audit(result, measured, tokenizer, sets, settings, runtime, oracle_audit=oracle_audit)
        if general_set is not None:
            from .io.tokens import encode, pad_id_of
            from .measure.utility import utility

            ids = encode(tokenizer, general_set, settings.max_tokens, "general")
            ppl = utility(measured, None, ids, runtime, settings.batch_size, pad_id_of(tokenizer))["general_ppl"]
            result.extra["utility"] = {"general_ppl": ppl, "general_sequences": len(ids)}
    if rank != 0:  # under torchrun only the main process reports and writes
        return
    print_audit(result, console, show_text)
    print_oracle(result, console)
    print_guard(result.extra, console)
    if out is not None:
        result.write(out, "audit", show_text)
        console.print(f"Wrote {out / 'audit.json'} and {out / 'audit.csv'}")


def parse_decoding_option(decoding: str | None):
    if decoding is None:
        return None
    from .evaluate.decoding import parse_decoding

    return parse_decoding(decoding)


def load_measured_model(model: str, runtime, load_options: dict, decoding_spec, sets: dict, settings):
    """(model, tokenizer, model info, wrap): `wrap` puts a decoding guard around a model (weights unchanged),
    None without --decoding. Attacks that change weights change the inner model and wrap it again."""
    from .io.models import load_model, state_sha256

    if decoding_spec is not None:
        from .evaluate.decoding import check_guard_inputs

        check_guard_inputs(decoding_spec, sets)
    with console.status("loading model"):
        lm, tokenizer = load_model(model, runtime, **load_options)
    info = {"source": model, "sha256": state_sha256(lm), "runtime": runtime.describe()}
    wrap = None
    if decoding_spec is not None:
        from .evaluate.decoding import describe, guard
        from .io.tokens import encode

        forget_ids = encode(tokenizer, sets["forget"], settings.max_tokens, "forget")
        retain_ids = encode(tokenizer, sets["retain"], settings.max_tokens, "retain") if sets.get("retain") else None
        guard(lm, decoding_spec, forget_ids, tokenizer=tokenizer, retain_ids=retain_ids,
              prefix_tokens=settings.prefix_tokens)  # a guard that cannot be made fails here, before any measure
        wrap = lambda inner: guard(inner, decoding_spec, forget_ids, tokenizer=tokenizer,  # noqa: E731
                                   retain_ids=retain_ids, prefix_tokens=settings.prefix_tokens)
        info["decoding"] = describe(decoding_spec)
    return lm, tokenizer, info, wrap


@app.command()
def attack(model: Model, forget: Forget, holdout: Annotated[str, typer.Option("--holdout", help="Unseen sequences "
                                                                            "of the same kind: the band.")],
           out: Annotated[Path, typer.Option("--out", help="Output folder (attack.json).")],
           retain: Retain = None,
           general: Annotated[str | None, typer.Option("--general", help="General text benign_relearn can train "
                                                       "on \\[default: Python docs].")] = None,
           attacks: Annotated[str | None, typer.Option("--attacks", help="Comma-separated names from `unmemorize "
                                                       "attacks` \\[default: those marked default there].")] = None,
           samples: Annotated[int, typer.Option("--samples", help="sampling: samples per prefix.")] = 8,
           temperature: Annotated[float, typer.Option("--temperature", help="sampling temperature.")] = 1.0,
           top_k: Annotated[int, typer.Option("--top-k", help="sampling: top-k.")] = 40,
           benign_on: Annotated[str | None, typer.Option("--benign-on", help="benign_relearn trains on: retain | "
                                                         "general \\[default: retain when given, else "
                                                         "general]")] = None,
           attack_arg: Annotated[list[str] | None, typer.Option("--attack-arg", metavar="KEY=VALUE",
                                                                help="Any attack setting (`unmemorize attacks`), "
                                                                "VALUE read as YAML. Repeatable.")] = None,
           decoding: Decoding = None,
           oracle: Annotated[str | None, typer.Option("--oracle", help="A model trained without the forget set: "
                                                      "the same attacks run on it too, and each attack counts the "
                                                      "records it brings back beyond those it shows there.")] = None,
           device: Device = "auto", dtype: Dtype = "auto", batch_size: BatchSize = 8, seed: Seed = 0,
           max_tokens: MaxTokens = 256, prefix_tokens: PrefixTokens = 32, band: BandRule = "quantile:0.05,0.95",
           allow_pickle: AllowPickle = False, trust_remote_code: TrustRemoteCode = False) -> None:
    """Robustness attacks on a (unlearned) model: does memorization come back? Writes attack.json."""
    import json

    from pydantic import ValidationError

    from .evaluate.attacks import AttackSettings, against_oracle, run_attacks
    from .evaluate.suite import audit_oracle, oracle_attacks
    from .io.files import atomic_write_text
    from .io.models import make_runtime
    from .measure.audit import audit as run_audit
    from .report.terminal import attack_table, print_guard

    settings = audit_settings(max_tokens, prefix_tokens, "0", band, batch_size, seed)
    try:
        chosen = {} if attacks is None else {"attacks": [a.strip() for a in attacks.split(",") if a.strip()]}
        attack_settings = AttackSettings(**{"samples": samples, "temperature": temperature, "top_k": top_k,
                                            "benign_on": benign_on, "seed": seed, **chosen,
                                            **parse_method_args(attack_arg, "--attack-arg")})
    except ValidationError as error:
        first = error.errors()[0]
        raise InputError(f"--{str(first['loc'][0]).replace('_', '-')}: {first['msg']}") from None
    check_out(out)
    decoding_spec = parse_decoding_option(decoding)
    sets = load_sets(forget=forget, holdout=holdout, retain=retain)
    if "benign_relearn" in attack_settings.attacks:
        if attack_settings.benign_on == "retain" and "retain" not in sets:
            raise InputError("--benign-on retain needs --retain")
        if attack_settings.benign_on == "general" or "retain" not in sets:
            sets["general"] = load_general(general)
    runtime = make_runtime(device, dtype)
    load_options = {"allow_pickle": allow_pickle, "trust_remote_code": trust_remote_code}
    lm, tokenizer, info, wrap = load_measured_model(model, runtime, load_options, decoding_spec, sets, settings)
    with console.status("auditing the model without attack"):
        baseline = run_audit(wrap(lm) if wrap else lm, tokenizer, sets, settings, runtime, model_info=info)
        # a bad --oracle fails here, before any attack runs
        oracle_audit = audit_oracle(oracle, sets, settings, runtime, load_options) if oracle else None
    with console.status("attacking"):
        results = run_attacks(lm, tokenizer, sets, settings, runtime, attack_settings, baseline=baseline, wrap=wrap)
    if oracle_audit is not None:
        with console.status("the same attacks on the oracle"):
            against_oracle(results, oracle_attacks(oracle_audit, sets, settings, runtime, attack_settings,
                                                   load_options))
    report = {"model": info, **({"oracle": oracle_audit.model} if oracle_audit else {}),
              "settings": {"audit": settings.model_dump(), "attacks": attack_settings.model_dump()},
              "baseline": {"band": baseline.band.to_json(), "forget": baseline.summary("forget")},
              **({"decoding": info["decoding"]} if "decoding" in info else {}), **results}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "attack.json", json.dumps(report, indent=1) + "\n")
    console.print(attack_table(results, baseline))
    print_guard(info, console)
    console.print(f"Wrote {out / 'attack.json'}")



# Options of unlearn and compare. They default to None so a --config file can fill them; flags win.
Opt = typer.Option
Lr = Annotated[float | None, Opt("--lr", help="Learning rate \\[default: the method's].")]
Margin = Annotated[float | None, Opt("--margin", help="Aim inside the bands by this fraction of their width (0 to "
                                      "0.5): a sequence gets gradient until it is that far inside. \\[default: the "
                                      "method's: hinge 0.25, others 0]")]
MaxSteps = Annotated[int | None, Opt("--max-steps", help="Cap on gradient steps. \\[default: 200]")]
Stop = Annotated[str | None, Opt("--stop", help="band | mean | steps \\[default: band]")]
TargetOpt = Annotated[str | None, Opt("--target", help="indistinguishable: no forget sequence extractable or "
                                      "verbatim, and every forget loss inside the loss band; ma: the first two "
                                      "only (the paper's). \\[default: indistinguishable]")]
RetainLoss = Annotated[str | None, Opt("--retain-loss", help="none | nll | kl \\[default: the method's]")]
RetainWeight = Annotated[float | None, Opt("--retain-weight", help="\\[default: 1.0]")]
Neighbours = Annotated[str | None, Opt("--neighbours", help="Unseen in-domain text that must stay as it was: each "
                                       "step adds --neighbour-weight * KL to the original model on a batch of it "
                                       "(any gradient method). Must not share sequences with --forget or "
                                       "--holdout.")]
NeighbourWeight = Annotated[float | None, Opt("--neighbour-weight", help="Weight of the --neighbours KL. "
                                              "\\[default: 3.0]")]
SamRho = Annotated[float | None, Opt("--sam-rho", help="Sharpness-aware unlearning (Fan et al. 2025): take the "
                                    "forget loss's gradient at the worst weights within this L2 radius, so that "
                                    "small weight changes (quantization, relearning) do not bring it back; one more "
                                    "forward and backward of the forget batch per step. \\[default: 0 = off]")]
Harden = Annotated[str | None, Opt("--harden", help="none | Q8_0 | Q5_0 | Q4_1 | Q4_0: quantization-aware "
                                   "unlearning: at every calibration also audit the weights round-tripped through "
                                   "this GGUF format, and keep giving gradient (taken at those weights) to a forget "
                                   "sequence that comes back there. \\[default: none]")]
OptimizerOpt = Annotated[str | None, Opt("--optimizer", help="adam | sophia: Sophia is second-order unlearning "
                                         "(SOUL): momentum over a diagonal Hessian estimate, clipped. "
                                         "\\[default: adam]")]
SophiaGamma = Annotated[float | None, Opt("--sophia-gamma", help="Sophia: gamma in lr * clip(m / max(gamma * h, "
                                          "eps), 1). \\[default: 0.04]")]
SophiaHessian = Annotated[str | None, Opt("--sophia-hessian", help="gnb | hutchinson: Sophia's diagonal Hessian "
                                          "estimate. \\[default: gnb]")]
SophiaEvery = Annotated[int | None, Opt("--sophia-every", help="Sophia: estimate the Hessian every this many "
                                        "steps. \\[default: 1]")]
Lora = Annotated[int | None, Opt("--lora", help="LoRA rank; 0 trains the weights. \\[default: 0]")]
MaskFraction = Annotated[float | None, Opt("--mask-fraction", help="Train only this fraction of weights (largest "
                                           "forget gradient). \\[default: 0 = all]")]
Localize = Annotated[str | None, Opt("--localize", help="causal:K: causal tracing ranks the layers by how much of "
                                   "the forget continuations their MLP output restores under noised prefixes "
                                   "(Meng et al. 2022); only the MLPs of the K top layers train. Writes "
                                   "localization.json; none: every layer. \\[default: the method's: hinge causal:6, "
                                   "the others none]")]
MaxUtilityDrop = Annotated[float | None, Opt("--max-utility-drop", help="\\[default: 0.10]")]
General = Annotated[str | None, Opt("--general", help="General text for utility \\[default: Python docs].")]
Config = Annotated[Path | None, Opt("--config", help="YAML file whose keys are these options.")]
Attacks = Annotated[bool | None, Opt("--attacks", help="Run the robustness attacks on the unlearned model.")]
MethodArg = Annotated[list[str] | None, Opt("--method-arg", metavar="KEY=VALUE", help="An option of the method "
                                          "(see `unmemorize methods`), VALUE read as YAML (beta=0.5 is a number). "
                                          "Repeatable.")]
CompareMethodArg = Annotated[list[str] | None, Opt("--method-arg", metavar="KEY=VALUE", help="Sets KEY for every "
                                                 "compared method that has that option; METHOD.KEY=VALUE for one "
                                                 "method only (see `unmemorize methods`). VALUE read as YAML. "
                                                 "Repeatable.")]
MaybeInt = Annotated[int | None, Opt()]
MaybeStr = Annotated[str | None, Opt()]
SETTING_KEYS = ("method", "lr", "margin", "max_steps", "stop", "target", "retain_loss", "retain_weight",
                "neighbour_weight", "sam_rho", "optimizer", "sophia_gamma", "sophia_hessian", "sophia_every",
                "harden", "lora", "mask_fraction", "localize", "max_utility_drop", "seed",
                "batch_size",
                "max_tokens", "prefix_tokens", "el_n", "el_sets", "band", "oracle", "attacks", "tasks")


@app.command()
def unlearn(
    forget: Forget, out: Annotated[Path, Opt("--out", help="New run folder.")],
    model: Annotated[str | None, Opt("--model", help="HF folder, hub id or .gguf file (with --previous: that "
                                     "run's model).")] = None,
    holdout: Holdout = None, retain: Retain = None,
    method: Annotated[str | None, Opt("--method", help="See `unmemorize methods`. \\[default: hinge]")] = None,
    method_arg: MethodArg = None,
    resume: Annotated[bool, Opt("--resume", help="Continue an interrupted run in <out>.partial.")] = False,
    previous: Annotated[Path | None, Opt("--previous", help="An earlier run to continue from (a later request): "
                                         "its model, and its ledger of forgotten sequences re-audited.")] = None,
    general: General = None, config: Config = None, lr: Lr = None, margin: Margin = None, max_steps: MaxSteps = None,
    stop: Stop = None, target: TargetOpt = None, retain_loss: RetainLoss = None, retain_weight: RetainWeight = None,
    neighbours: Neighbours = None, neighbour_weight: NeighbourWeight = None, sam_rho: SamRho = None,
    optimizer: OptimizerOpt = None, sophia_gamma: SophiaGamma = None, sophia_hessian: SophiaHessian = None,
    sophia_every: SophiaEvery = None, harden: Harden = None, lora: Lora = None,
    mask_fraction: MaskFraction = None, localize: Localize = None, max_utility_drop: MaxUtilityDrop = None,
    device: Device = "auto",
    dtype: Dtype = "auto", batch_size: MaybeInt = None, seed: MaybeInt = None, max_tokens: MaybeInt = None,
    prefix_tokens: MaybeInt = None, el_n: MaybeStr = None, el_sets: MaybeStr = None, band: MaybeStr = None,
    oracle: Oracle = None,
    attacks: Attacks = None, tasks: Tasks = None,
    show_text: ShowText = False, allow_pickle: AllowPickle = False, trust_remote_code: TrustRemoteCode = False,
) -> int:
    """Unlearn the forget set; audit before and after; write the run folder. Exit 0 target reached, 3 not."""
    from .io.models import make_runtime
    from .runs.run import check_out_folder
    from .runs.run import unlearn as run_unlearn

    flags = {key: value for key, value in locals().items() if key in SETTING_KEYS}
    settings = unlearn_settings(config, {**flags, "method_args": parse_method_args(method_arg)})
    neighbours = neighbours or config_value(config, "neighbours")
    model = model_of(model, previous)
    check_out_folder(out, resume)
    sets = load_sets(forget=forget, holdout=holdout, retain=retain)
    neighbour_set = load_sets(neighbours=neighbours).get("neighbours")
    general_set = load_general(general)
    runtime = make_runtime(device, dtype)
    result = run_unlearn(model, sets, general_set, settings, runtime, out, resume=resume, show_text=show_text,
                         load_options={"allow_pickle": allow_pickle, "trust_remote_code": trust_remote_code},
                         previous=previous, neighbours=neighbour_set,
                         sources=sources_of(forget=forget, holdout=holdout, retain=retain, neighbours=neighbours))
    print_run(result)
    return 0 if result.target_reached else 3


@app.command()
def compare(
    forget: Forget, out: Annotated[Path, Opt("--out", help="New compare folder (runs/<method>/, compare.json).")],
    model: Model,
    methods: Annotated[str | None, Opt("--methods", help="Comma-separated method names (see `unmemorize "
                                       "methods`). \\[default: the --config file's method, else hinge]")] = None,
    method_arg: CompareMethodArg = None,
    holdout: Holdout = None, retain: Retain = None,
    general: General = None, config: Config = None, lr: Lr = None, margin: Margin = None, max_steps: MaxSteps = None,
    stop: Stop = None, target: TargetOpt = None, retain_loss: RetainLoss = None, retain_weight: RetainWeight = None,
    neighbours: Neighbours = None, neighbour_weight: NeighbourWeight = None, sam_rho: SamRho = None,
    optimizer: OptimizerOpt = None, sophia_gamma: SophiaGamma = None, sophia_hessian: SophiaHessian = None,
    sophia_every: SophiaEvery = None, harden: Harden = None, lora: Lora = None,
    mask_fraction: MaskFraction = None, localize: Localize = None, max_utility_drop: MaxUtilityDrop = None,
    device: Device = "auto",
    dtype: Dtype = "auto", batch_size: MaybeInt = None, seed: MaybeInt = None, max_tokens: MaybeInt = None,
    prefix_tokens: MaybeInt = None, el_n: MaybeStr = None, el_sets: MaybeStr = None, band: MaybeStr = None,
    oracle: Oracle = None,
    attacks: Attacks = None, tasks: Tasks = None,
    show_text: ShowText = False, allow_pickle: AllowPickle = False, trust_remote_code: TrustRemoteCode = False,
) -> int:
    """Several methods on one request, each from the same model and seed: one table, one report. Exit 0 when
    every method reached the target, 3 otherwise."""
    from .io.models import make_runtime
    from .report.terminal import compare_table
    from .runs.compare import compare as run_compare
    from .runs.compare import ranked, rows_of

    if methods is None:
        methods = config_value(config, "method") or default_method()
    names = [m.strip() for m in methods.split(",") if m.strip()]
    if len(set(names)) != len(names) or not names:
        raise InputError(f"--methods {methods!r}: give distinct method names, comma-separated")
    flags = {key: value for key, value in locals().items() if key in SETTING_KEYS}
    method_args = parse_method_args(method_arg)
    runs = {name: unlearn_settings(config, {**flags, "method": name, "method_args": method_args}, compared=names)
            for name in names}
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")
    if (out / "runs").exists() and any((out / "runs").iterdir()):
        raise InputError(f"--out {out}: already holds runs; choose a new folder")
    neighbours = neighbours or config_value(config, "neighbours")
    sets = load_sets(forget=forget, holdout=holdout, retain=retain)
    neighbour_set = load_sets(neighbours=neighbours).get("neighbours")
    general_set = load_general(general)
    runtime = make_runtime(device, dtype)
    results = run_compare(model, sets, general_set, runs, runtime, out, show_text=show_text,
                          load_options={"allow_pickle": allow_pickle, "trust_remote_code": trust_remote_code},
                          neighbours=neighbour_set,
                          sources=sources_of(forget=forget, holdout=holdout, retain=retain, neighbours=neighbours))
    console.print(compare_table(ranked(rows_of(results, names))))
    console.print(f"Wrote {out / 'compare.json'} and {out / 'report.html'}")
    return 0 if all(r.target_reached for r in results) else 3


def default_method() -> str:
    """The method `unlearn` and `compare` use when none is given: the recommended one (UnlearnSettings)."""
    from .runs.config import UnlearnSettings

    return UnlearnSettings.model_fields["method"].default


def model_of(model: str | None, previous: Path | None) -> str:
    """The model to unlearn from: --model, or the model of the --previous run (a later request continues it)."""
    if previous is None:
        if model is None:
            raise InputError("--model is required (or --previous RUN to continue an earlier run)")
        return model
    previous_model = previous / "model"
    if not previous_model.is_dir():
        raise InputError(f"--previous {previous}: no model/ folder; give a finished unlearn run folder")
    if model is not None and Path(model).resolve() != previous_model.resolve():
        raise InputError(f"--model {model} differs from the --previous run's model {previous_model}; drop --model")
    return str(previous_model)


def sources_of(**paths: str | None) -> dict[str, str]:
    """How the ledger and the certificate name the set files: absolute paths (hf: names as given)."""
    return {name: path if path.startswith("hf:") else str(Path(path).resolve())
            for name, path in paths.items() if path is not None}


AUDIT_KEYS = ("max_tokens", "prefix_tokens", "el_n", "el_sets", "band", "batch_size", "seed")
EVALUATION_KEYS = ("oracle", "attacks", "tasks", "task_limit")


# Keys of the --config YAML that name set files rather than settings (a flag wins over each).
CONFIG_SETS = ("neighbours",)


def read_config(config: Path) -> dict:
    """The --config YAML as {option name: value}; InputError (exit 2) when missing, bad or not a mapping."""
    import yaml

    try:
        loaded = yaml.safe_load(config.read_text())
    except FileNotFoundError:
        raise InputError(f"--config {config}: file not found") from None
    except yaml.YAMLError as error:
        raise InputError(f"--config {config}: bad YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(loaded, dict):
        raise InputError(f"--config {config}: expected a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in loaded.items()}


def config_value(config: Path | None, key: str):
    """A set file named in the --config YAML (`neighbours:`), None when there is no config or no such key."""
    value = read_config(config).get(key) if config is not None else None
    return None if value is None else str(value)


def unlearn_settings(config: Path | None, flags: dict, compared: list[str] | None = None):
    """Defaults, then the --config YAML, then the flags given on the command line (`method_args`: the YAML's
    updated by the flags'). `compared`: the methods of a `compare`, whose options are picked out of the
    method args (`method_args_for`)."""
    from pydantic import ValidationError

    from .runs.config import UnlearnSettings

    values: dict = {}
    if config is not None:
        values = {k: v for k, v in read_config(config).items() if k not in CONFIG_SETS}
    if not isinstance(values.get("method_args") or {}, dict):
        raise InputError(f"--config {config}: method_args must be a mapping of option names to values")
    method_args = {**(values.get("method_args") or {}), **(flags.get("method_args") or {})}
    values.update({k: v for k, v in flags.items() if v is not None})
    method = values.get("method", default_method())
    values["method_args"] = method_args_for(method, method_args, compared)
    if isinstance(values.get("el_n"), str | int):
        values["el_n"] = parse_el_n(str(values["el_n"]))
    if isinstance(values.get("el_sets"), str):
        values["el_sets"] = parse_el_sets(values["el_sets"])
    audit_values = {k: values.pop(k) for k in AUDIT_KEYS if k in values and k != "seed"}
    if "seed" in values:
        audit_values["seed"] = values["seed"]
    evaluation = {k: values.pop(k) for k in EVALUATION_KEYS if k in values}
    if isinstance(evaluation.get("tasks"), str):
        evaluation["tasks"] = [t.strip() for t in evaluation["tasks"].split(",") if t.strip()]
    if "attacks" in evaluation:  # true: the default attacks; a mapping: AttackSettings fields; false: off
        chosen = evaluation["attacks"]
        evaluation["attacks"] = {} if chosen is True else (chosen or None)
    try:
        return UnlearnSettings(**values, audit=audit_settings_from(audit_values), evaluation=evaluation)
    except ValidationError as error:
        first = error.errors()[0]
        loc = first["loc"][1:] if first["loc"][0] == "evaluation" and len(first["loc"]) > 1 else first["loc"]
        name = str(loc[0]).replace("_", "-")
        where = f"--config {config}: " if config is not None and name in {k.replace("_", "-") for k in values} else ""
        raise InputError(f"{where}--{name}: {first['msg']}") from None


def parse_method_args(texts: list[str] | None, option: str = "--method-arg") -> dict:
    """--method-arg KEY=VALUE (repeatable) as {KEY: VALUE}, VALUE read as a YAML scalar (0.5 a number, true a
    boolean); a value YAML reads as anything else (a list, a mapping, null) stays the text given."""
    import yaml

    args: dict = {}
    for text in texts or []:
        key, sep, raw = text.partition("=")
        if not sep or not key.strip():
            raise InputError(f"{option} {text!r}: expected KEY=VALUE")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        args[key.strip()] = value if isinstance(value, str | int | float | bool) else raw
    return args


def method_args_for(method: str | None, args: dict, compared: list[str] | None = None) -> dict:
    """The options of `method` among `args`: METHOD.KEY entries name their method; a plain KEY is for the method
    of `unlearn`, and in a `compare` for every compared method that has such an option."""
    from .unlearning.methods import METHODS

    def has(name: str, option: str) -> bool:
        return name in METHODS and option.replace("-", "_") in METHODS[name].config.model_fields

    chosen: dict = {}
    for key, value in args.items():
        name, dot, option = str(key).rpartition(".")
        if dot:
            if name not in (compared or [method]):
                where = f"--methods {','.join(compared)}" if compared else f"--method {method}"
                raise InputError(f"--method-arg {key}={value}: {name!r} is not in {where}")
            if name == method:
                chosen[option] = value
        elif compared is None or method not in METHODS or has(method, option):
            chosen[key] = value  # unlearn: checked against the method (an unknown key is an error there)
        elif not any(has(other, option) for other in compared):
            raise InputError(f"--method-arg {key}={value}: none of the compared methods ({', '.join(compared)}) has "
                             f"an option {option!r}")
    return chosen


def audit_settings_from(values: dict):
    from pydantic import ValidationError

    from .measure.audit import AuditSettings

    try:
        return AuditSettings(**values)
    except ValidationError as error:
        first = error.errors()[0]
        raise InputError(f"--{str(first['loc'][0]).replace('_', '-')}: {first['msg']}") from None


def load_general(source: str | None) -> list:
    if source is not None:
        from .io.sets import load_set

        return load_set(source)
    from .runs.embedded import default_general

    return default_general()


def print_run(result) -> None:
    import os

    from .report.terminal import attack_table, compare_table, print_oracle
    from .runs.compare import rows_of

    if os.environ.get("RANK", "0") != "0":  # under torchrun only the main process reports
        return
    console.print(compare_table(rows_of([result]), title="Unlearning run"))
    print_oracle(result.after, console)
    if "attacks" in result.after.extra:
        console.print(attack_table(result.after.extra["attacks"], result.after))
    console.print(f"stop: {result.run['stop_reason']}")
    console.print(f"Wrote {result.out}")


@app.command()
def demo(out: Annotated[Path, Opt("--out", help="Demo folder.")] = Path("unmemorize-demo"),
         oracle: Annotated[bool, Opt("--oracle", help="Also build the oracle (victim without the request).")] = False,
         attacks: Annotated[bool, Opt("--attacks", help="Also attack both unlearned models.")] = False,
         rebuild: Annotated[bool, Opt("--rebuild", help="Train the victim (and the oracle) from scratch instead "
                                      "of merging the adapter shipped in the package (minutes to half an "
                                      "hour on a CPU).")] = False,
         device: Device = "auto", dtype: Dtype = "auto") -> None:
    """The main job on the embedded default: victim, audit, unlearn (hinge vs the aggregate rule), compare."""
    from .io.models import make_runtime
    from .runs.demo import run_demo

    check_out(out)
    run_demo(out, make_runtime(device, dtype), console, oracle=oracle, attacks=attacks, rebuild=rebuild)


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="An unlearn run folder or a compare folder.")],
           show_text: ShowText = False) -> None:
    """Re-render report.html from a run folder (or a compare folder) without touching anything else."""
    from .report import render_compare_report, render_run_report

    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: not a folder")
    if (run_dir / "compare.json").exists() and not (run_dir / "run.json").exists():
        runs = {child.name: child for child in sorted((run_dir / "runs").iterdir()) if (child / "run.json").exists()}
        for folder in runs.values():
            render_run_report(folder, show_text)
        path = render_compare_report(run_dir, runs, show_text)
    else:
        path = render_run_report(run_dir, show_text)
    console.print(f"Wrote {path}")


@app.command()
def scan(
    model: Model,
    corpus: Annotated[str, Opt("--corpus", help="Documents to scan, read as a stream: JSONL, CSV, Parquet, .txt "
                               "(one document a line), hf:NAME[:SPLIT].")],
    out: Annotated[Path, Opt("--out", help="Scan folder: top.jsonl (a ready --forget set) and scan.json.")],
    top: Annotated[int, Opt("--top", help="Windows kept: the K most memorized.")] = 100,
    window: Annotated[int, Opt("--window", help="Window length in tokens.")] = 64,
    stride: Annotated[int | None, Opt("--stride", help="Tokens between window starts (default: --window).")] = None,
    min_tokens: Annotated[int, Opt("--min-tokens", help="Shorter documents are counted, not scanned.")] = 16,
    text_field: Annotated[str, Opt("--text-field", help="Field (column) holding a document's text.")] = "text",
    id_field: Annotated[str | None, Opt("--id-field", help="Field holding a document's id (default: id when "
                                        "present, else the line number).")] = None,
    prefix_tokens: PrefixTokens = 32, batch_size: BatchSize = 8,
    shard_docs: Annotated[int, Opt("--shard-docs", help="Documents per shard (checkpoint, split between "
                                   "processes).")] = 1000,
    resume: Annotated[bool, Opt("--resume", help="Continue the interrupted scan in --out.")] = False,
    device: Device = "auto", dtype: Dtype = "auto", show_text: ShowText = False,
    allow_pickle: AllowPickle = False, trust_remote_code: TrustRemoteCode = False,
) -> None:
    """The most memorized windows of a corpus of any size (streamed, checkpointed per shard, data parallel
    under torchrun). Ctrl-C writes what it has and exits 130."""
    import contextlib

    from .io.corpus import open_corpus
    from .io.models import load_model, make_runtime, state_sha256
    from .runs.scan import check_out_folder, join_processes, scan_settings, top_table
    from .runs.scan import scan as run_scan

    settings = scan_settings(top=top, window=window, stride=stride, min_tokens=min_tokens,
                             prefix_tokens=prefix_tokens, batch_size=batch_size, shard_docs=shard_docs,
                             text_field=text_field, id_field=id_field)
    runtime = make_runtime(device, dtype)
    documents = open_corpus(corpus, text_field, id_field)
    rank, world = join_processes(runtime)
    check_out_folder(out, resume, world)
    with console.status("loading model") if rank == 0 else contextlib.nullcontext():
        lm, tokenizer = load_model(model, runtime, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    info = {"source": model, "sha256": state_sha256(lm), "runtime": runtime.describe()}
    result = run_scan(lm, tokenizer, documents, settings, runtime, out, resume=resume, model_info=info,
                      show_progress=True)
    if result is not None:
        summary = result.summary
        console.print(top_table(result, show_text))
        console.print(f"{summary['documents']:,} documents, {summary['windows']:,} windows, "
                      f"{summary['tokens']:,} tokens in {summary['seconds']:.1f} s "
                      f"({summary['tokens_per_s']:,.0f} tokens/s); {summary['verbatim_windows']:,} windows verbatim")
        console.print(f"Wrote {out / 'top.jsonl'} and {out / 'scan.json'}")


@app.command()
def verify(certificate: Annotated[Path, Opt("--certificate", help="certificate.json of a run.")], model: Model,
           forget: Annotated[str | None, Opt("--forget", help="\\[default: the file the certificate names]")] = None,
           holdout: Annotated[str | None, Opt("--holdout", help="\\[default: the file the certificate names]")] = None,
           device: Device = "auto",
           dtype: Annotated[str | None, Opt("--dtype", help="\\[default: the certified weights dtype]")] = None,
           allow_pickle: AllowPickle = False, trust_remote_code: TrustRemoteCode = False) -> int:
    """Re-audit a model and check each claim of a certificate. Exit 0 when all hold, 3 listing what fails."""
    from .io.models import load_model, make_runtime
    from .report.certificate import read_certificate
    from .runs.verify import verify_certificate

    claims = read_certificate(certificate)
    sets = load_sets(forget=forget, holdout=holdout)
    # state_sha256 hashes dtypes too: the weights must load in the dtype they were certified in ("auto" keeps
    # float32 weights and computes as the run did)
    runtime = make_runtime(device, dtype or ("bfloat16" if claims["output_model"].get("weights") == "bfloat16"
                                             else "auto"))
    with console.status("loading model"):
        lm, tokenizer = load_model(model, runtime, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    with console.status("re-auditing"):
        result = verify_certificate(claims, lm, tokenizer, runtime, sets)
    for claim in result.claims:
        console.print(f"{'[green]PASS[/]' if claim['ok'] else '[red]FAIL[/]'} {claim['name']}: {claim['reason']}")
    console.print("[green]All claims hold.[/]" if result.ok else f"[red]{len(result.failures)} claim(s) fail.[/]")
    return 0 if result.ok else 3


@app.command()
def methods(as_json: Annotated[bool, Opt("--json", help="Print {name: {summary, options: {key: {default, help}}}} "
                                        "as JSON.")] = False) -> None:
    """List the unlearning methods and their options (--method-arg KEY=VALUE)."""
    import json

    from rich.table import Table

    from .unlearning.methods import FAMILIES, METHODS

    described = {name: spec.describe() for name, spec in METHODS.items()}
    if as_json:
        print(json.dumps(described, indent=1))
        return
    default = default_method()
    table = Table(title=f"Methods (--method; default: {default})", title_justify="left")
    for column in ("name", "what it does", "options (default)", "selection", "retain loss", "lr", "localize"):
        table.add_column(column)
    for name, spec in METHODS.items():
        options = "\n".join(f"{key}={option['default']!r}" for key, option in described[name]["options"].items())
        shown = f"{name} (default)" if name == default else name
        table.add_row(shown, spec.summary, options or "-", spec.selection, spec.retain_loss, f"{spec.lr:g}",
                      spec.localize)
    console.print(table)
    helps: dict[tuple, list[str]] = {}  # an option shared by several methods is listed once
    for name, item in described.items():
        for key, option in item["options"].items():
            helps.setdefault((key, repr(option["default"]), option["help"]), []).append(name)
    options_table = Table(title="Options (--method-arg KEY=VALUE)", title_justify="left")
    for column in ("option", "methods", "default", "what it sets"):
        options_table.add_column(column)
    for (key, default, text), names in helps.items():
        options_table.add_row(key, ", ".join(names), default, text)
    console.print(options_table)
    families = Table(title="The survey's families (Liu et al. 2024) in unmemorize", title_justify="left")
    for column in ("family", "methods or options"):
        families.add_column(column)
    for family, (names, options) in FAMILIES.items():
        families.add_row(family, ", ".join(names) or options)
    console.print(families)
    console.print("Any gradient method also takes --retain-loss none|nll|kl, --retain-weight, --lora R, "
                  "--mask-fraction F, --localize causal:K, --optimizer adam|sophia, --sam-rho, --harden, --margin, "
                  "--stop band|mean|steps, --target indistinguishable|ma, --max-steps.")


@app.command()
def plan(model: Model,
         method: Annotated[str | None, Opt("--method", help="See `unmemorize methods`. \\[default: hinge]")] = None,
         lora: Lora = None, retain_loss: RetainLoss = None, localize: Localize = None,
         devices: Annotated[int | None, Opt("--devices", help="Devices the run would use. \\[default: 1]")] = None,
         batch: Annotated[int | None, Opt("--batch", help="Forget sequences that get gradient in one step. "
                                          "\\[default: 12]")] = None,
         length: Annotated[int | None, Opt("--length", help="Tokens per sequence. \\[default: 256]")] = None,
         retain_batch: Annotated[int | None, Opt("--retain-batch", help="Retain (and neighbour) sequences per "
                                                 "step. \\[default: 12]")] = None,
         neighbours: Annotated[bool, Opt("--neighbours", help="The run gets --neighbours.")] = False,
         batch_size: Annotated[int | None, Opt("--batch-size", help="Sequences per no-grad forward pass. "
                                               "\\[default: 8]")] = None,
         device: Annotated[str | None, Opt("--device", help="cuda | cpu: the device planned for. "
                                           "\\[default: cuda]")] = None,
         dtype: Dtype = "auto",
         device_memory: Annotated[float | None, Opt("--device-memory", help="GiB of one device \\[default: the "
                                                   "first CUDA device here, else this machine's RAM]")] = None,
         as_json: Annotated[bool, Opt("--json", help="Print the plan as JSON.")] = False,
         trust_remote_code: TrustRemoteCode = False) -> None:
    """Memory per device of an `unlearn` run (weights, gradients, Adam, reference model, activations), from the
    model's config alone (no weights loaded), and the launch command to use. Computed, not measured."""
    import json

    from .report.terminal import plan_table
    from .runs.plan import plan as make_plan
    from .runs.plan import plan_settings

    settings = plan_settings(method=method, lora=lora, retain_loss=retain_loss, localize=localize, devices=devices,
                             batch=batch, length=length, retain_batch=retain_batch, neighbours=neighbours,
                             score_batch=batch_size, device=device, dtype=dtype, device_memory=device_memory)
    result = make_plan(model, settings, trust_remote_code=trust_remote_code).to_json()
    if as_json:
        print(json.dumps(result, indent=1))
        return
    lora = f", LoRA r={settings.lora}" if settings.lora else ""
    step = f"{result['precision']['name']}, {settings.batch} forget sequences x {result['settings']['length']} tokens"
    console.print(f"Memory of `unlearn --model {model} --method {settings.method}{lora}` ({step} a step), "
                  "computed by `unmemorize plan` from the config, not measured:", soft_wrap=True, highlight=False)
    console.print(plan_table(result))
    fits = f"fits ({result['recommended']})" if result["recommended"] else "[red]no layout fits[/]: try --lora, " \
        "--dtype bfloat16 or more --devices"
    console.print(f"On {result['device_memory'] / 2**30:.1f} GiB per device ({result['device_memory_source']}): {fits}")
    console.print(result["command"], soft_wrap=True, highlight=False)


@app.command("attacks")
def list_attacks(as_json: Annotated[bool, Opt("--json", help="Print {attacks: {name: {about, default}}, settings: "
                                              "{key: {default, help}}} as JSON.")] = False) -> None:
    """List the robustness attacks (`attack --attacks`, `unlearn --attacks`) and their settings (`attack
    --attack-arg KEY=VALUE`, `attacks:` in the YAML)."""
    import json

    from rich.table import Table

    from .evaluate.attacks import ABOUT, DEFAULT_ATTACKS, AttackSettings

    settings = {key: {"default": field.get_default(call_default_factory=True), "help": field.description}
                for key, field in AttackSettings.model_fields.items() if key != "attacks"}
    if as_json:
        print(json.dumps({"attacks": {name: {"about": about, "default": name in DEFAULT_ATTACKS}
                                      for name, about in ABOUT.items()}, "settings": settings}, indent=1))
        return
    table = Table(title="Attacks (--attacks NAME,...)", title_justify="left")
    for column in ("name", "runs", "what it does"):
        table.add_column(column)
    for name, about in ABOUT.items():
        table.add_row(name, "default" if name in DEFAULT_ATTACKS else "when named", about)
    console.print(table)
    options = Table(title="Settings (attack --attack-arg KEY=VALUE; attacks: {KEY: VALUE} in the YAML)",
                    title_justify="left")
    for column in ("setting", "default", "what it sets"):
        options.add_column(column)
    for key, item in settings.items():
        options.add_row(key, repr(item["default"]), item["help"] or "")
    console.print(options)


def _print_version(value: bool) -> None:
    if value:
        from ._version import __version__

        print(f"unmemorize {__version__}")
        raise typer.Exit()


@app.callback()
def _group(version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", is_eager=True,
                                                 callback=_print_version)] = False) -> None:
    """Find memorized training sequences, unlearn them one by one, prove it."""


def main() -> None:
    """Entry point: exit 0 done, 3 target not reached, 2 bad input or usage, 1 internal error."""
    command = typer.main.get_command(app)
    try:
        code = command.main(args=sys.argv[1:], prog_name="unmemorize", standalone_mode=False)
    except InputError as error:
        print(f"unmemorize: error: {error}", file=sys.stderr)
        sys.exit(2)
    except typer.exceptions.TyperException as error:  # usage errors of the command line parser
        if type(error).__name__ == "NoArgsIsHelpError":
            print(error.format_message(), file=sys.stderr)
        else:
            print(f"unmemorize: error: {error.format_message()}", file=sys.stderr)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        print("unmemorize: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
