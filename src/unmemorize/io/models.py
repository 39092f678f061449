"""Loading and saving models: local folders, hub ids, GGUF files; device, dtype and autocast."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError
from .hub import hub_access
from .tokens import set_context_length

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16")


@dataclass(frozen=True)
class Runtime:
    """Where and in what precision the model runs.

    `weights` is the storage dtype; `compute` is the autocast dtype (None: no autocast). `auto` keeps float32
    master weights and autocasts matmuls to bf16 where the hardware does it fast; `float32` is exact and is
    what metric checks use; `bfloat16` also stores the weights in bf16 (half the memory).
    """

    device: torch.device
    weights: torch.dtype
    compute: torch.dtype | None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.compute is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute)

    def describe(self) -> dict:
        return {"device": str(self.device), "weights": str(self.weights).removeprefix("torch."),
                "autocast": None if self.compute is None else str(self.compute).removeprefix("torch.")}


def _bf16_is_fast(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def make_runtime(device: str = "auto", dtype: str = "auto") -> Runtime:
    if device not in DEVICES:
        raise InputError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if dtype not in DTYPES:
        raise InputError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available")
    dev = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    if dtype == "float32":
        return Runtime(dev, torch.float32, None)
    if dtype == "bfloat16":
        return Runtime(dev, torch.bfloat16, torch.bfloat16)
    return Runtime(dev, torch.float32, torch.bfloat16 if _bf16_is_fast(dev) else None)


def load_model(spec: str | os.PathLike, runtime: Runtime | None = None, *, allow_pickle: bool = False,
               trust_remote_code: bool = False):
    """Load (model, tokenizer) from a local folder, a `.gguf` file, or a hub id. The model is in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    runtime = runtime or make_runtime()
    spec = str(spec)
    path, where, kwargs = _locate(spec, trust_remote_code)
    if path.is_dir() and not allow_pickle and not any(path.glob("*.safetensors")):
        raise InputError(f"model {spec}: no .safetensors weights (pass --allow-pickle to load pickle "
                         "weights, only from a source you trust)")
    if not allow_pickle and "gguf_file" not in kwargs:
        kwargs["use_safetensors"] = True
    quiet = logging.getLogger("transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        tokenizer, model = _fetch(spec, path, "load", lambda: (
            AutoTokenizer.from_pretrained(where, **kwargs),
            AutoModelForCausalLM.from_pretrained(where, dtype=runtime.weights, **kwargs)))
    finally:
        quiet.setLevel(level)
    if kwargs.get("gguf_file"):
        _drop_gguf_quantizer(model)
    set_context_length(tokenizer, context_length(model.config))
    model.to(runtime.device)
    model.eval()
    return model, tokenizer


def read_config(spec: str | os.PathLike, trust_remote_code: bool = False):
    """The model's config (transformers `PretrainedConfig`) from what `load_model` takes (a local folder, a `.gguf`
    file or a hub id, the hub reached through `io.hub`: at once or not at all); no weights are read."""
    from transformers import AutoConfig

    spec = str(spec)
    path, where, kwargs = _locate(spec, trust_remote_code)
    return _fetch(spec, path, "read its config", lambda: AutoConfig.from_pretrained(where, **kwargs))


def _locate(spec: str, trust_remote_code: bool) -> tuple[Path, str, dict]:
    """(the local path, what to pass `from_pretrained`, its keyword arguments) for a folder, a `.gguf` file or a
    hub id; InputError for a local path that is none of them."""
    path = Path(spec)
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise InputError(f"model {spec}: GGUF file not found")
        return path, str(path.parent), {**kwargs, "gguf_file": path.name}
    if path.exists() and not path.is_dir():
        raise InputError(f"model {spec}: expected a model folder, a .gguf file or a hub id")
    if path.is_dir() and not (path / "config.json").exists():
        raise InputError(f"model {spec}: folder has no config.json (not a Hugging Face checkpoint)")
    return path, spec, kwargs


def _fetch(spec: str, path: Path, what: str, load):
    """`load()` (a `from_pretrained`), from the hub only through `io.hub` when `path` is not local; any failure
    becomes one InputError line: "model SPEC: cannot WHAT: ..."."""
    hub = contextlib.nullcontext() if path.exists() else hub_access(f"model {spec}")
    try:
        # a local load (a folder, the cache without the hub) is quick and its progress bar noise on stderr; a
        # download keeps its bar
        with hub as access, (no_progress_bars() if access is None or access.offline else contextlib.nullcontext()):
            try:
                return load()
            except OSError:  # not cached, while the hub cannot be reached (or offline mode is on)
                if access is not None and access.offline:
                    raise InputError(f"model {spec}: cannot {what}: {access.reason()}") from None
                raise
    except InputError:
        raise
    except Exception as error:  # transformers raises OSError, ValueError, KeyError ... for a bad model
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        hint = "" if path.exists() else " (not a local path; the hub could not provide it either)"
        raise InputError(f"model {spec}: cannot {what}{hint}: {first}") from None


# Config fields that hold the longest input a model takes, in tokens (the names differ between families; GPT-2
# style configs map max_position_embeddings to n_positions themselves).
CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def context_length(config) -> int | None:
    """The model's context length from its config (of the text model, for a multimodal one); None when the
    config names none (a model without position limit)."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for field in CONTEXT_FIELDS:
        value = getattr(text_config, field, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 1:
            return value
    return None


@contextlib.contextmanager
def no_progress_bars():
    """Silence transformers' per-shard progress bars (loading, saving) for the duration."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _drop_gguf_quantizer(model) -> None:
    """A GGUF checkpoint is dequantized on load; the marker left behind blocks save_pretrained and training."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def save_checkpoint(model, tokenizer, dest: Path, *, replace: bool = True) -> None:
    """Write a safetensors checkpoint with its tokenizer to `dest` atomically (temporary folder, rename).

    An existing `dest` is replaced only once the new one is complete; with `replace=False` it is kept (a cache
    entry that another process finished first: never moved away under a reader).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    try:
        with no_progress_bars():
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if dest.exists() and not replace:
            shutil.rmtree(tmp, ignore_errors=True)
        elif dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def state_sha256(model) -> str:
    """Hash of the weights' values (names, dtypes, bytes), independent of file layout."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def folder_sha256(folder: Path) -> str:
    """Hash of every file in a folder (relative names and bytes): proves a folder was not modified."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(folder)).encode())
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
