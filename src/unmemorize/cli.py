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
BandRule = Annotated[str, typer.Option("--band", help="quantile:LO,HI | meanstd:K | mean")]
ShowText = Annotated[bool, typer.Option("--show-text", help="Show sequence text (off: ids and hashes only).")]
AllowPickle = Annotated[bool, typer.Option("--allow-pickle", help="Allow pickle weights (trusted sources only).")]
TrustRemoteCode = Annotated[bool, typer.Option("--trust-remote-code", help="Run the model repo's own code.")]


def parse_el_n(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"--el-n {text!r}: expected comma-separated integers") from None
    if any(v < 0 for v in values):
        raise InputError(f"--el-n {text!r}: values must be >= 0")
    return [] if values == [0] else [v for v in values if v]


def audit_settings(max_tokens: int, prefix_tokens: int, el_n: str, band: str, batch_size: int, seed: int):
    from pydantic import ValidationError

    from .audit import AuditSettings

    try:
        return AuditSettings(max_tokens=max_tokens, prefix_tokens=prefix_tokens, el_n=parse_el_n(el_n), band=band,
                             batch_size=batch_size, seed=seed)
    except ValidationError as error:
        first = error.errors()[0]
        raise InputError(f"--{str(first['loc'][0]).replace('_', '-')}: {first['msg']}") from None


def load_sets(**sources: str | None) -> dict:
    """Load every given set before any model work, so bad input fails fast and writes nothing."""
    from .data import load_set

    return {name: load_set(source) for name, source in sources.items() if source is not None}


def check_out(out: Path | None) -> None:
    if out is not None and out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")


@app.command()
def audit(model: Model, forget: Forget, holdout: Holdout = None, retain: Retain = None, out: Out = None,
          device: Device = "auto", dtype: Dtype = "auto", batch_size: BatchSize = 8, seed: Seed = 0,
          max_tokens: MaxTokens = 256, prefix_tokens: PrefixTokens = 32, el_n: ElN = "10",
          band: BandRule = "quantile:0.05,0.95", show_text: ShowText = False, allow_pickle: AllowPickle = False,
          trust_remote_code: TrustRemoteCode = False) -> None:
    """Per-sequence measures, the band, statuses and privacy AUCs; writes audit.json and audit.csv."""
    from .audit import audit as run_audit
    from .display import print_audit
    from .model import load_model, make_runtime, state_sha256

    settings = audit_settings(max_tokens, prefix_tokens, el_n, band, batch_size, seed)
    check_out(out)
    sets = load_sets(forget=forget, holdout=holdout, retain=retain)
    runtime = make_runtime(device, dtype)
    with console.status("loading model"):
        lm, tokenizer = load_model(model, runtime, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    info = {"source": model, "sha256": state_sha256(lm), "runtime": runtime.describe()}
    with console.status("measuring every sequence"):
        result = run_audit(lm, tokenizer, sets, settings, runtime, model_info=info)
    print_audit(result, console, show_text)
    if out is not None:
        result.write(out, "audit", show_text)
        console.print(f"Wrote {out / 'audit.json'} and {out / 'audit.csv'}")


Opt = typer.Option  # unlearn/compare options default to None so a --config file can fill them; flags win


@app.command()
def unlearn(
    model: Model, forget: Forget, out: Annotated[Path, Opt("--out", help="New run folder.")],
    holdout: Holdout = None, retain: Retain = None,
    method: Annotated[str | None, Opt("--method", help="See `unmemorize methods`. [default: sga]")] = None,
    general: Annotated[str | None, Opt("--general", help="General text for utility [default: Python docs].")] = None,
    config: Annotated[Path | None, Opt("--config", help="YAML file whose keys are these options.")] = None,
    resume: Annotated[bool, Opt("--resume", help="Continue an interrupted run in <out>.partial.")] = False,
    lr: Annotated[float | None, Opt("--lr", help="Learning rate [default: the method's].")] = None,
    max_steps: Annotated[int | None, Opt("--max-steps", help="Cap on gradient steps. [default: 200]")] = None,
    stop: Annotated[str | None, Opt("--stop", help="band | mean | steps [default: band]")] = None,
    retain_loss: Annotated[str | None, Opt("--retain-loss", help="none | nll | kl [default: the method's]")] = None,
    retain_weight: Annotated[float | None, Opt("--retain-weight", help="[default: 1.0]")] = None,
    lora: Annotated[int | None, Opt("--lora", help="LoRA rank; 0 trains the weights. [default: 0]")] = None,
    mask_fraction: Annotated[float | None, Opt("--mask-fraction", help="Train only this fraction of weights "
                                               "(largest forget gradient). [default: 0 = all]")] = None,
    max_utility_drop: Annotated[float | None, Opt("--max-utility-drop", help="[default: 0.10]")] = None,
    device: Device = "auto", dtype: Dtype = "auto",
    batch_size: Annotated[int | None, Opt("--batch-size")] = None, seed: Annotated[int | None, Opt("--seed")] = None,
    max_tokens: Annotated[int | None, Opt("--max-tokens")] = None,
    prefix_tokens: Annotated[int | None, Opt("--prefix-tokens")] = None,
    el_n: Annotated[str | None, Opt("--el-n")] = None, band: Annotated[str | None, Opt("--band")] = None,
    show_text: ShowText = False, allow_pickle: AllowPickle = False, trust_remote_code: TrustRemoteCode = False,
) -> int:
    """Unlearn the forget set; audit before and after; write the run folder. Exit 0 target reached, 3 not."""
    from .model import make_runtime
    from .unlearn.run import check_out_folder
    from .unlearn.run import unlearn as run_unlearn

    flags = {"method": method, "lr": lr, "max_steps": max_steps, "stop": stop, "retain_loss": retain_loss,
             "retain_weight": retain_weight, "lora": lora, "mask_fraction": mask_fraction,
             "max_utility_drop": max_utility_drop, "seed": seed, "batch_size": batch_size, "max_tokens": max_tokens,
             "prefix_tokens": prefix_tokens, "el_n": el_n, "band": band}
    settings = unlearn_settings(config, flags)
    check_out_folder(out, resume)
    sets = load_sets(forget=forget, holdout=holdout, retain=retain)
    general_set = load_general(general)
    runtime = make_runtime(device, dtype)
    result = run_unlearn(model, sets, general_set, settings, runtime, out, resume=resume, show_text=show_text,
                         load_options={"allow_pickle": allow_pickle, "trust_remote_code": trust_remote_code})
    print_run(result)
    return 0 if result.target_reached else 3


AUDIT_KEYS = ("max_tokens", "prefix_tokens", "el_n", "band", "batch_size", "seed")


def unlearn_settings(config: Path | None, flags: dict):
    """Defaults, then the --config YAML, then the flags given on the command line."""
    import yaml
    from pydantic import ValidationError

    from .unlearn.config import UnlearnSettings

    values: dict = {}
    if config is not None:
        try:
            loaded = yaml.safe_load(config.read_text())
        except FileNotFoundError:
            raise InputError(f"--config {config}: file not found") from None
        except yaml.YAMLError as error:
            raise InputError(f"--config {config}: bad YAML ({str(error).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise InputError(f"--config {config}: expected a mapping of option names to values")
        values = {str(k).replace("-", "_"): v for k, v in loaded.items()}
    values.update({k: v for k, v in flags.items() if v is not None})
    if isinstance(values.get("el_n"), str | int):
        values["el_n"] = parse_el_n(str(values["el_n"]))
    audit_values = {k: values.pop(k) for k in AUDIT_KEYS if k in values and k != "seed"}
    if "seed" in values:
        audit_values["seed"] = values["seed"]
    try:
        return UnlearnSettings(**values, audit=audit_settings_from(audit_values))
    except ValidationError as error:
        first = error.errors()[0]
        name = str(first["loc"][0]).replace("_", "-")
        where = f"--config {config}: " if config is not None and name in {k.replace("_", "-") for k in values} else ""
        raise InputError(f"{where}--{name}: {first['msg']}") from None


def audit_settings_from(values: dict):
    from pydantic import ValidationError

    from .audit import AuditSettings

    try:
        return AuditSettings(**values)
    except ValidationError as error:
        first = error.errors()[0]
        raise InputError(f"--{str(first['loc'][0]).replace('_', '-')}: {first['msg']}") from None


def load_general(source: str | None) -> list:
    if source is not None:
        from .data import load_set

        return load_set(source)
    from .embedded import default_general

    return default_general()


def print_run(result) -> None:
    import os

    from .display import run_table

    if os.environ.get("RANK", "0") != "0":  # under torchrun only the main process reports
        return
    console.print(run_table([result]))
    console.print(f"stop: {result.run['stop_reason']}")
    console.print(f"Wrote {result.out}")


@app.command()
def demo(out: Annotated[Path, Opt("--out", help="Demo folder.")] = Path("unmemorize-demo"),
         oracle: Annotated[bool, Opt("--oracle", help="Also build the oracle (victim without the request).")] = False,
         device: Device = "auto", dtype: Dtype = "auto") -> None:
    """The main job on the embedded default: victim, audit, unlearn (sga vs the aggregate rule), compare."""
    from .demo import run_demo
    from .model import make_runtime

    check_out(out)
    run_demo(out, make_runtime(device, dtype), console, oracle=oracle)


@app.command()
def methods() -> None:
    """List the unlearning methods."""
    from rich.table import Table

    from .unlearn.methods import PRESETS

    table = Table(title="Methods (--method)", title_justify="left")
    for column in ("name", "what it does", "selection", "retain loss", "lr"):
        table.add_column(column)
    for preset in PRESETS.values():
        table.add_row(preset.name, preset.summary, preset.selection, preset.retain_loss, f"{preset.lr:g}")
    console.print(table)
    console.print("Any gradient method also takes --retain-loss none|nll|kl, --retain-weight, --lora R, "
                  "--mask-fraction F, --stop band|mean|steps, --max-steps.")


@app.callback()
def _group() -> None:
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
