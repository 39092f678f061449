"""GPU check: does unmemorize work, and how fast, on one CUDA device (a check and a benchmark, one command).

    python bench/gpu_check.py                          # CUDA when there is one (bf16), else CPU (float32)
    python bench/gpu_check.py --device cpu             # what CI runs: smaller sizes (--size quick)
    python bench/gpu_check.py --json gpu_check.json    # the table and every number, also as JSON

From a source checkout, with nothing installed but PyTorch, transformers, accelerate, peft and the few small
wheels `docs/benchmarks.md` lists (the script says which are missing); it puts `src/` and `tests/` on the
path itself. Phases, each with its wall time and peak memory (CUDA: torch.cuda.max_memory_allocated after a
reset; CPU: the resident-set high-water mark, VmHWM, after a reset through /proc/self/clear_refs):

  peak    the matmul peak of the device in the compute dtype, measured here: 2 n^3 FLOPs over the fastest of
          10 timed n x n products, n = N/4, N/2, N (--size), at the start and again at the end; the fastest
          of all counts. Every MFU below is a fraction of it.
  parity  (a) the tiny memorizing model of tests/tiny.py audited on the CPU in float32 and on the device in
          the chosen precision: per sequence MA, verbatim and EL must be equal. Tolerance: a teacher-forced
          argmax may differ only at a near-tie, a position whose float32 gap between the two largest logits
          is at most 2e, e the largest |logit difference| between the two runs over every position and token
          of the audit's own batches (a smaller gap cannot flip: each logit moves by at most e); EL, decoded
          off the text, may differ only on a sequence with such a near-tie. Anything else fails.
  unlearn (b) the tiny model trained on the device, then `unmemorize.unlearn` with the default method and
          target (hinge, indistinguishable) must reach the target. Two settings differ from the defaults, for
          the tiny model: lr 1e-3 (the default 3e-4 is the 135M model's) and max_utility_drop 10 (its general
          text is unseen records of the forget set's own kind, whose perplexity forgetting records raises).
  score, el, scan, step (c) throughput on a SmolLM2-135M-shaped Llama (hidden 576, 30 layers, 9 heads, 3 kv
          heads, intermediate 1536, vocabulary 49152, tied embeddings) with random weights, built from its
          config (no download), and a word-level tokenizer of 49152 made-up words: `score_tokens` (the
          audit's teacher-forced pass), `extraction_likelihoods` (EL_10) on random text (every prefix
          diverges: the most decoding EL can need), `scan` over a synthetic JSONL corpus, and the unlearning
          loop of the default method (hinge, retain and neighbour sets, every weight trained: --localize none)
          on sequences the model generated
          itself (so they are "memorized"). tokens/s counts the real (unpadded) tokens through the model;
          FLOPs = 2 N per token of every forward pass + 4 N per token of a forward pass with gradient
          (backward), N the parameter count (the tied embedding counted once, as the output projection;
          attention's T^2 products, under 7% at these lengths, are not counted); MFU = FLOPs/s / peak. On a
          GPU each MFU must be at most 100% (FLOPs not over-counted); on a CPU shared with other work the
          peak and the phases meet different loads, so there it is only reported.

Exit status: 0 every check passed; 1 a check failed (the table says which); 2 bad input or a missing package.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import random
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Import name -> the wheel that provides it: what the project's code used here imports beyond PyTorch,
# transformers, accelerate and peft (and what those bring: numpy, safetensors, tokenizers, huggingface_hub,
# pyyaml, jinja2, psutil, ...). Checked before anything else so a bare machine gets one clear message.
NEEDED = {"pydantic": "pydantic", "rich": "rich", "sklearn": "scikit-learn", "scipy": "scipy",
          "matplotlib": "matplotlib", "gguf": "gguf", "jinja2": "jinja2"}


def missing_packages() -> list[str]:
    return [wheel for module, wheel in NEEDED.items() if importlib.util.find_spec(module) is None]


def import_project() -> str | None:
    """Import everything the phases use, up front (no phase's time then holds an import); the name of a module
    that is missing, or None."""
    try:
        import accelerate  # noqa: F401
        import machine  # noqa: F401  (bench/machine.py)
        import tiny  # noqa: F401  (tests/tiny.py)
        import torch  # noqa: F401
        import transformers  # noqa: F401

        import unmemorize.measure.audit
        import unmemorize.runs.run
        import unmemorize.runs.scan
        import unmemorize.unlearning.session  # noqa: F401
    except ModuleNotFoundError as error:
        return error.name or str(error)
    return None


def put_project_on_path() -> None:
    """src/ (the package, unless it is installed), tests/ (the tiny model's recipe, tests/tiny.py) and bench/
    (machine.py)."""
    if importlib.util.find_spec("unmemorize") is None:
        sys.path.insert(0, str(ROOT / "src"))
    for folder in (ROOT / "tests", ROOT / "bench"):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))


SMOLLM2_135M = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 8192,
                "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True}
# the same architecture, scaled down, for the script's own test (seconds on a CPU)
SMALL = {**SMOLLM2_135M, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024}
SHAPES = {"smollm2-135m": SMOLLM2_135M, "small": SMALL}


@dataclass(frozen=True)
class Sizes:
    """How much work each throughput phase does (sequences x tokens), and its batch sizes."""

    matmul_n: int  # side of the square matmuls that measure the peak
    score_sequences: int
    score_tokens: int
    batch: int  # scoring batch (EL decodes DECODE_BATCH_FACTOR times as many rows, as the audit does)
    el_sequences: int
    el_tokens: int
    scan_windows: int  # windows of 64 tokens
    step_forget: int  # forget sequences of the unlearning loop (all "memorized", all get gradient)
    step_tokens: int
    step_others: int  # retain, neighbour and holdout sequences, and the loop's retain_batch
    steps: int  # gradient steps timed (the loop runs one more)


SIZES = {
    "full": Sizes(matmul_n=16384, score_sequences=1024, score_tokens=256, batch=64, el_sequences=64, el_tokens=64,
                  scan_windows=16384, step_forget=32, step_tokens=128, step_others=12, steps=10),
    "quick": Sizes(matmul_n=1024, score_sequences=16, score_tokens=128, batch=8, el_sequences=2, el_tokens=32,
                   scan_windows=48, step_forget=4, step_tokens=64, step_others=2, steps=2),
    "smoke": Sizes(matmul_n=256, score_sequences=4, score_tokens=32, batch=4, el_sequences=2, el_tokens=20,
                   scan_windows=8, step_forget=2, step_tokens=24, step_others=2, steps=2),
}
PHASES = ("peak", "parity", "unlearn", "score", "el", "scan", "step")


@dataclass
class Phase:
    name: str
    what: str
    check: str | None = None  # what must hold; None: a measurement only
    passed: bool | None = None
    seconds: float = 0.0
    peak_memory_mib: float | None = None
    tokens: int | None = None
    tokens_per_s: float | None = None
    flops: float | None = None
    mfu: float | None = None
    details: dict = field(default_factory=dict)
    error: str | None = None


# ---- measurement: time, memory, tokens ------------------------------------------------------------------------


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_high_water_mib() -> float | None:
    try:
        return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024
    except (OSError, AttributeError):
        return None


def reset_rss_high_water() -> bool:
    """Linux >= 4.0: writing 5 to clear_refs resets VmHWM to the current resident set."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def measured(phase: Phase, device) -> Iterator[None]:
    """Wall time and peak memory of the block into `phase` (the block's own start and end synchronized)."""
    import torch

    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        phase.details["memory"] = "RSS high-water mark" + ("" if reset_rss_high_water() else
                                                          " of the whole process (could not reset it)")
    start, cpu = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        synchronize(device)
        phase.seconds = time.perf_counter() - start
        phase.details["cpu_seconds"] = time.process_time() - cpu  # on a shared CPU: less noisy than wall time
        if device.type == "cuda":
            phase.peak_memory_mib = torch.cuda.max_memory_allocated(device) / 2**20
            phase.details["memory"] = "torch.cuda.max_memory_allocated"
        else:
            phase.peak_memory_mib = rss_high_water_mib()


class TokenFlops:
    """Counts the real tokens of every forward call of a model, and those run with gradient enabled.

    A forward pre-hook sees each call's input_ids; under a KV cache the last columns of the attention mask say
    which of the new positions are padding (as unmemorize.evaluate.efficiency.TokenCounter counts). The hook
    is a closure, not a bound method, so a deep copy of the model (the loop's frozen original) counts here too.
    """

    def __init__(self, model, n_params: int) -> None:
        import torch

        self.n_params, self.forward, self.with_grad = n_params, 0, 0

        def count(module, args, kwargs) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None:
                return
            mask = kwargs.get("attention_mask")
            tokens = int(mask[:, -ids.shape[-1]:].sum()) if mask is not None else ids.numel()
            self.forward += tokens
            if torch.is_grad_enabled():
                self.with_grad += tokens

        self.handle = model.register_forward_pre_hook(count, with_kwargs=True)

    def snapshot(self) -> tuple[int, int]:
        return self.forward, self.with_grad

    def flops(self, since: tuple[int, int] = (0, 0)) -> float:
        """2 N per forward token + 4 N per token that is backpropagated."""
        return 2.0 * self.n_params * (self.forward - since[0]) + 4.0 * self.n_params * (self.with_grad - since[1])

    def close(self) -> None:
        self.handle.remove()


def throughput(phase: Phase, tokens: int, flops: float, seconds: float) -> None:
    phase.tokens, phase.flops = tokens, flops
    phase.tokens_per_s = tokens / seconds if seconds > 0 else None
    phase.details.update({"timed_seconds": seconds, "tflops_per_s": flops / seconds / 1e12 if seconds > 0 else None})


def utilization(phases: list[Phase], peak_flops: float | None, checked: bool) -> None:
    """MFU of every throughput phase against the peak. Checked (<= 100%: the FLOPs are not over-counted) on a
    GPU, which the script has to itself; on a CPU shared with other work the peak and the phases see different
    loads, so it is reported only."""
    for phase in phases:
        tflops = phase.details.get("tflops_per_s")
        if phase.tokens is None or tflops is None or not peak_flops:
            continue
        phase.mfu = tflops * 1e12 / peak_flops
        if checked:
            phase.check, phase.passed = "MFU <= 100% (FLOPs not over-counted)", phase.mfu <= 1.0


def release_memory(device) -> None:
    """What earlier phases freed goes back to the system, so the next phase's peak starts from what is live."""
    import ctypes
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed heap pages otherwise


# ---- phases ----------------------------------------------------------------------------------------------------


def peak_matmul(runtime, largest: int, repeats: int = 10) -> dict[int, float]:
    """FLOP/s of square matmuls in the compute dtype, for n = largest/4, largest/2, largest: 2 n^3 FLOPs over the
    fastest of `repeats` timed products (after two warm-ups) of random matrices."""
    import torch

    dtype = runtime.compute or runtime.weights
    generator = torch.Generator(device=runtime.device).manual_seed(0)
    rates = {}
    for n in (largest // 4, largest // 2, largest):
        a = torch.randn(n, n, device=runtime.device, dtype=dtype, generator=generator)
        b = torch.randn(n, n, device=runtime.device, dtype=dtype, generator=generator)
        best = float("inf")
        for k in range(repeats + 2):
            synchronize(runtime.device)
            start = time.perf_counter()
            torch.matmul(a, b)
            synchronize(runtime.device)
            if k >= 2:
                best = min(best, time.perf_counter() - start)
        rates[n] = 2.0 * n**3 / best
    return rates


def teacher_forced_logits(model, token_lists: list[list[int]], runtime, batch_size: int, pad_id: int) -> list:
    """Float32 logits (T-1, V) of every sequence, from the batches `score_tokens` makes (same shapes, same
    padding: on a deterministic device the very logits the audit's scores came from)."""
    import torch

    from unmemorize.io.tokens import length_batches, pad
    from unmemorize.measure.scoring import forward_logits

    results: list = [None] * len(token_lists)
    with torch.no_grad():
        for indices in length_batches(token_lists, batch_size):
            input_ids, mask = pad([token_lists[i] for i in indices], pad_id, device=runtime.device)
            logits = forward_logits(model, input_ids, mask, runtime)[:, :-1].float().cpu()
            for row, index in enumerate(indices):
                results[index] = logits[row, : len(token_lists[index]) - 1]
    return results


def parity(phase: Phase, folder: Path, sets: dict, runtime) -> None:
    """(a): the audit of the tiny model on the CPU in float32 against the audit on `runtime`."""
    import numpy as np

    from unmemorize.io.models import load_model, make_runtime
    from unmemorize.io.tokens import encode, pad_id_of
    from unmemorize.measure.audit import AuditSettings, audit

    settings = AuditSettings(el_sets=None)  # EL of every set, not only the forget set's
    exact = make_runtime("cpu", "float32")
    results, logits = {}, {}
    for name, where in (("cpu", exact), ("device", runtime)):
        model, tokenizer = load_model(folder, where)
        results[name] = audit(model, tokenizer, sets, settings, where)
        ids = [i for set_name, seqs in sets.items() for i in encode(tokenizer, seqs, settings.max_tokens, set_name)]
        logits[name] = teacher_forced_logits(model, ids, where, settings.batch_size, pad_id_of(tokenizer))
        del model
    e = max(float((a - b).abs().max()) for a, b in zip(logits["cpu"], logits["device"], strict=True))
    tie = 2 * e
    counts = {"identical": 0, "explained": 0, "unexplained": 0}
    unexplained, near_ties = [], 0
    for ref, got, exact_logits in zip(results["cpu"].sequences, results["device"].sequences, logits["cpu"],
                                      strict=True):
        top2 = exact_logits.topk(2, dim=-1).values
        gaps = (top2[:, 0] - top2[:, 1]).numpy()
        ties = gaps <= tie
        near_ties += int(ties.sum())
        flipped = np.flatnonzero(ref.scores.hits != got.scores.hits)
        same = flipped.size == 0 and ref.el == got.el  # the same hits: the same MA and verbatim
        explained = bool(ties[flipped].all()) and (ref.el == got.el or bool(ties.any()))
        kind = "identical" if same else "explained" if explained else "unexplained"
        counts[kind] += 1
        if kind == "unexplained":
            unexplained.append({"set": ref.set, "id": ref.id, "ma": [ref.ma, got.ma], "verbatim":
                                [ref.verbatim, got.verbatim], "el": [ref.el, got.el],
                                "flips_not_at_near_ties": int((~ties[flipped]).sum())})
    phase.details.update({"sequences": len(results["cpu"].sequences), **counts,
                          "max_logit_difference": e, "near_tie_positions": near_ties,
                          "extractable_cpu_device": [results[k].summary("forget")["extractable"] for k in results],
                          "unexplained_rows": unexplained[:10]})
    phase.check = "MA, verbatim, EL equal per sequence (flips only at near-ties)"
    phase.passed = counts["unexplained"] == 0


def unlearn_on_device(phase: Phase, work: Path, runtime, max_steps: int) -> None:
    """(b): the tiny model trained on the device, then unlearned with the default method to the default target."""
    from tiny import build_tiny_model, sentences

    from unmemorize.io.sets import Sequence
    from unmemorize.runs.config import UnlearnSettings
    from unmemorize.runs.run import unlearn

    start = time.perf_counter()
    sets = build_tiny_model(work / "tiny-device", runtime=runtime)
    trained = time.perf_counter() - start
    general = [Sequence(f"g{i}", text) for i, text in enumerate(sentences(10, seed=99))]
    neighbours = [Sequence(f"n{i}", text) for i, text in enumerate(sentences(10, seed=7))]
    settings = UnlearnSettings(lr=1e-3, max_utility_drop=10.0, max_steps=max_steps)
    result = unlearn(str(work / "tiny-device"), sets, general, settings, runtime, work / "run", neighbours=neighbours)
    before, after = result.before.summary("forget"), result.after.summary("forget")
    memorized = before["extractable"] >= 4  # f0-f3, seen 8 times, at least
    phase.details.update({
        "method": settings.method, "target": settings.target, "train_seconds": trained, "steps": result.run["steps"],
        "stop_reason": result.run["stop_reason"], "target_reached": result.target_reached,
        "run_phase_seconds": result.run["phase_seconds"],
        "extractable_before_after": [before["extractable"], after["extractable"]],
        "verbatim_before_after": [before["verbatim"], after["verbatim"]],
        "loss_memorized_before_after": [before["loss_memorized"], after["loss_memorized"]],
        "trained_model_memorizes": memorized})
    phase.check = "trained model memorizes; unlearn reaches the target"
    phase.passed = memorized and result.target_reached


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer of `vocab_size` tokens: <pad>, <unk>, <eos>, then the words w3, w4, ..."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<pad>", "<unk>", "<eos>"])}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def random_model(shape: dict, runtime):
    """A Llama of `shape` with random weights (seeded), on the runtime's device and in its weight dtype."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**shape, pad_token_id=0, eos_token_id=2, bos_token_id=None)
    with torch.device(runtime.device):
        model = LlamaForCausalLM(config)
    model.to(runtime.weights).eval()
    return model


def random_ids(rng: random.Random, count: int, length: int, vocab_size: int) -> list[list[int]]:
    return [[rng.randrange(3, vocab_size) for _ in range(length)] for _ in range(count)]


def timed_tokens(phase: Phase, counter: TokenFlops, device, work: Callable[[], object]) -> object:
    """Run `work` inside `measured`, and record its tokens, FLOPs and tokens/s."""
    since = counter.snapshot()
    with measured(phase, device):
        result = work()
    throughput(phase, counter.forward - since[0], counter.flops(since), phase.seconds)
    return result


def score_phase(phase: Phase, model, counter, sizes: Sizes, runtime, rng) -> None:
    from machine import bare_forward  # bench/machine.py

    from unmemorize.measure.scoring import score_tokens

    ids = random_ids(rng, sizes.score_sequences, sizes.score_tokens, model.config.vocab_size)
    score_tokens(model, ids[: sizes.batch], runtime, sizes.batch, 0)  # warm-up: kernels, autotuning
    timed_tokens(phase, counter, runtime.device, lambda: score_tokens(model, ids, runtime, sizes.batch, 0))
    start = time.perf_counter()
    bare_forward(model, ids, runtime, sizes.batch, 0)
    synchronize(runtime.device)
    floor = time.perf_counter() - start
    phase.details.update({"sequences": len(ids), "tokens_each": sizes.score_tokens, "batch": sizes.batch,
                          "bare_forward_seconds": floor, "score_over_bare_forward": phase.seconds / floor})


def el_phase(phase: Phase, model, counter, sizes: Sizes, runtime, rng) -> None:
    from unmemorize.measure.extraction import DECODE_BATCH_FACTOR, divergence_points, extraction_likelihoods
    from unmemorize.measure.scoring import score_tokens

    ids = random_ids(rng, sizes.el_sequences, sizes.el_tokens, model.config.vocab_size)
    scores = score_tokens(model, ids, runtime, sizes.batch, 0)
    decode_batch = DECODE_BATCH_FACTOR * sizes.batch
    timed_tokens(phase, counter, runtime.device,
                 lambda: extraction_likelihoods(model, scores, [10], runtime, decode_batch, 0))
    jobs = sum(len(divergence_points(s, s.n_tokens - 10)) for s in scores)
    phase.details.update({"sequences": len(ids), "tokens_each": sizes.el_tokens, "n": 10,
                          "decode_batch": decode_batch, "prefixes_decoded": jobs})


def scan_phase(phase: Phase, model, tokenizer, counter, sizes: Sizes, runtime, rng, work: Path) -> None:
    from unmemorize.io.corpus import open_corpus
    from unmemorize.runs.scan import ScanSettings, scan

    window = 64
    corpus_file = work / "corpus.jsonl"
    with corpus_file.open("w") as out:  # documents of 4 windows each
        for doc in range(-(-sizes.scan_windows // 4)):
            words = " ".join(f"w{rng.randrange(3, model.config.vocab_size)}" for _ in range(4 * window))
            out.write(json.dumps({"id": f"d{doc}", "text": words}) + "\n")
    settings = ScanSettings(window=window, batch_size=sizes.batch, top=10, shard_docs=256)
    result = timed_tokens(phase, counter, runtime.device,
                          lambda: scan(model, tokenizer, open_corpus(str(corpus_file)), settings, runtime,
                                       work / "scan"))
    phase.details.update({"windows": result.summary["windows"], "window": window, "batch": sizes.batch,
                          "scan_tokens_per_s": result.summary["tokens_per_s"]})


def step_phase(phase: Phase, model, tokenizer, counter, sizes: Sizes, runtime, rng, work: Path) -> None:
    """The unlearning loop of the default method for steps + 1 steps; timed from the first optimizer step to the
    last (steady state: each interval holds the loop's scoring of the forget set, one gradient step, and the
    band's re-measurement every 5 steps)."""
    from accelerate import Accelerator
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from unmemorize.measure.extraction import greedy_continue
    from unmemorize.measure.utility import utility
    from unmemorize.runs.config import UnlearnSettings
    from unmemorize.unlearning.context import TokenSets
    from unmemorize.unlearning.session import unlearn_model

    vocab, length = model.config.vocab_size, sizes.step_tokens
    prompts = random_ids(rng, sizes.step_forget, 8, vocab)
    tails = greedy_continue(model, prompts, [length - 8] * len(prompts), runtime, 8 * sizes.batch, 0)
    others = sizes.step_others
    sets = TokenSets(forget=[p + t for p, t in zip(prompts, tails, strict=True)],
                     forget_names=[f"f{i}" for i in range(len(prompts))],
                     holdout=random_ids(rng, 2 * others, length, vocab), retain=random_ids(rng, others, length, vocab),
                     general=random_ids(rng, others, length, vocab),
                     neighbours=random_ids(rng, others, length, vocab))
    # every weight trains (--localize none): the FLOPs below count a full backward, 4 N a token
    settings = UnlearnSettings(stop="steps", max_steps=sizes.steps + 1, retain_batch=others, max_utility_drop=1e9,
                               localize="none", audit={"batch_size": sizes.batch})
    utility_before = utility(model, sets.retain, sets.general, runtime, sizes.batch, 0)
    (work / "loop").mkdir()
    marks: list[tuple[float, tuple[int, int]]] = []

    def mark(optimizer, args, kwargs) -> None:
        synchronize(runtime.device)
        marks.append((time.perf_counter(), counter.snapshot()))

    hook = register_optimizer_step_post_hook(mark)
    try:
        with measured(phase, runtime.device):
            outcome = unlearn_model(model, tokenizer, settings, sets, runtime, work / "loop", utility_before,
                                    Accelerator(cpu=runtime.device.type == "cpu")).outcome
    finally:
        hook.remove()
    whole = phase.seconds
    if len(marks) >= 2:
        (t0, c0), (t1, c1) = marks[0], marks[-1]
        flops = 2.0 * counter.n_params * (c1[0] - c0[0]) + 4.0 * counter.n_params * (c1[1] - c0[1])
        throughput(phase, c1[1] - c0[1], flops, t1 - t0)  # tokens/s: tokens trained (with gradient)
        phase.details["seconds_per_step"] = (t1 - t0) / (len(marks) - 1)
    phase.seconds = whole
    phase.details.update({"method": settings.method, "steps": outcome.steps, "timed_steps": len(marks) - 1,
                          "stop_reason": outcome.stop_reason, "forget": f"{len(sets.forget)} x {length}",
                          "retain_neighbour_batch": others, "forward_tokens_timed":
                          marks[-1][1][0] - marks[0][1][0] if len(marks) >= 2 else None})
    if len(marks) < 2:
        phase.passed, phase.check = False, "the loop took at least 2 gradient steps"


# ---- the run ---------------------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                        help="auto: cuda when available (default)")
    parser.add_argument("--dtype", choices=["bf16", "float32", "bfloat16"], default=None,
                        help="bf16: float32 weights, bf16 autocast (the project's 'auto' on a GPU); float32; "
                             "bfloat16: bf16 weights too. Default: bf16 on cuda, float32 on cpu")
    parser.add_argument("--size", choices=list(SIZES), default=None,
                        help="work per throughput phase: full (default on cuda), quick (default on cpu), smoke")
    parser.add_argument("--shape", choices=list(SHAPES), default="smollm2-135m",
                        help="the random model of the throughput phases (small: for the script's own test)")
    parser.add_argument("--only", default=",".join(PHASES), help=f"comma-separated phases of {', '.join(PHASES)}")
    parser.add_argument("--max-steps", type=int, default=200,
                        help="cap on the steps of (b)'s unlearning (the default's 200; 0 makes (b) fail: the "
                             "script's test uses it)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--json", type=Path, default=None, help="write every number to this JSON file")
    args = parser.parse_args(argv)
    args.phases = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = sorted(set(args.phases) - set(PHASES))
    if unknown:
        parser.error(f"--only: unknown phase(s) {', '.join(unknown)}; choose from {', '.join(PHASES)}")
    return args


def make_runtime_for(device_name: str, dtype: str | None):
    import torch

    from unmemorize.io.models import Runtime

    if device_name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    device = torch.device("cuda" if device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
                          else "cpu")
    dtype = dtype or ("bf16" if device.type == "cuda" else "float32")
    if dtype == "float32":
        return Runtime(device, torch.float32, None)
    if dtype == "bfloat16":
        return Runtime(device, torch.bfloat16, torch.bfloat16)
    return Runtime(device, torch.float32, torch.bfloat16)


def machine_info(runtime) -> dict:
    import torch
    import transformers
    from machine import cpu_model  # bench/machine.py

    info = {"cpu": cpu_model(), "cpu_cores": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "runtime": runtime.describe()}
    if runtime.device.type == "cuda":
        props = torch.cuda.get_device_properties(runtime.device)
        info.update({"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                     "cuda": torch.version.cuda})
    return info


def run_phase(phase: Phase, work: Callable[[], None], device) -> Phase:
    """Run a phase; an exception fails it (with its message) instead of stopping the other phases."""
    release_memory(device)
    started = time.perf_counter()
    print(f"[gpu_check] {phase.name}: {phase.what} ...", file=sys.stderr, flush=True)
    try:
        work()
    except Exception as error:  # a failed phase is reported in the table, the others still run
        phase.passed, phase.error = False, f"{type(error).__name__}: {error}".splitlines()[0][:300]
        phase.check = phase.check or "runs without error"
    print(f"[gpu_check] {phase.name}: {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    return phase


def fmt(value, spec: str = ".3g") -> str:
    return "" if value is None else format(value, spec)


def table(phases: list[Phase]) -> str:
    rows = ["| phase | what | check | result | seconds | CPU seconds | peak memory MiB | tokens | tokens/s | MFU |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for p in phases:
        result = "" if p.passed is None else "pass" if p.passed else "FAIL" + (f" ({p.error})" if p.error else "")
        rows.append(f"| {p.name} | {p.what} | {p.check or ''} | {result} | {p.seconds:.2f} | "
                    f"{fmt(p.details.get('cpu_seconds'), '.2f')} | "
                    f"{fmt(p.peak_memory_mib, '.0f')} | {fmt(p.tokens, ',')} | {fmt(p.tokens_per_s, ',.0f')} | "
                    f"{fmt(None if p.mfu is None else 100 * p.mfu, '.1f')}{'' if p.mfu is None else '%'} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    missing = missing_packages()
    if missing:
        print(f"gpu_check: missing package(s) {', '.join(missing)}. Carry their wheels beside the checkout and "
              f"install them: pip install --no-index --find-links wheels/ {' '.join(missing)} "
              "(docs/benchmarks.md, 'GPU check', lists the wheels and how to download them)", file=sys.stderr)
        return 2
    put_project_on_path()
    absent = import_project()
    if absent:
        wheel = NEEDED.get(absent.split(".")[0], absent.split(".")[0])
        print(f"gpu_check: cannot import {absent!r}: install {wheel} (torch, transformers, accelerate and peft are "
              "expected on the machine; docs/benchmarks.md, 'GPU check', lists the wheels to carry)",
              file=sys.stderr)
        return 2
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    runtime = make_runtime_for(args.device, args.dtype)
    cuda = runtime.device.type == "cuda"
    if cuda and runtime.compute is not torch.bfloat16:
        print("gpu_check: note: on CUDA the check is meant for bf16 (--dtype bf16)", file=sys.stderr)
    size_name = args.size or ("full" if cuda else "quick")
    sizes, shape = SIZES[size_name], SHAPES[args.shape]
    rng = random.Random(0)
    started = time.perf_counter()
    info = machine_info(runtime)
    phases: list[Phase] = []
    dtype = str(runtime.compute or runtime.weights).removeprefix("torch.")
    peak = Phase("peak", f"{dtype} matmul peak: n = {sizes.matmul_n // 4}, {sizes.matmul_n // 2}, {sizes.matmul_n}, "
                         "at the start and the end")
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        if "peak" in args.phases:

            def measure_peak() -> None:
                with measured(peak, runtime.device):
                    rates = peak_matmul(runtime, sizes.matmul_n)
                peak.details.update({"dtype": dtype, "start_tflops_per_s": {n: r / 1e12 for n, r in rates.items()}})

            phases.append(run_phase(peak, measure_peak, runtime.device))
        if "parity" in args.phases:
            phase = Phase("parity", "(a) tiny model: CPU float32 audit vs this runtime's")

            def check_parity() -> None:
                from tiny import build_tiny_model

                sets = build_tiny_model(work / "tiny-cpu")  # the tests' fixture: CPU float32
                with measured(phase, runtime.device):
                    parity(phase, work / "tiny-cpu", sets, runtime)

            phases.append(run_phase(phase, check_parity, runtime.device))
        if "unlearn" in args.phases:
            phase = Phase("unlearn", "(b) tiny model trained here, unlearn (hinge, indistinguishable)")

            def check_unlearn() -> None:
                with measured(phase, runtime.device):
                    unlearn_on_device(phase, work / "unlearn", runtime, args.max_steps)

            phases.append(run_phase(phase, check_unlearn, runtime.device))
        wanted = [p for p in ("score", "el", "scan", "step") if p in args.phases]
        if wanted:
            model = random_model(shape, runtime)
            tokenizer = word_tokenizer(shape["vocab_size"])
            n_params = sum(p.numel() for p in model.parameters())  # a tied matrix is one parameter
            counter = TokenFlops(model, n_params)
            info["throughput_model"] = {"shape": args.shape, "parameters": n_params, **shape}
            s = sizes
            what = {"score": f"(c) score_tokens, {s.score_sequences} x {s.score_tokens} tokens, batch {s.batch}",
                    "el": f"(c) EL_10, {s.el_sequences} random x {s.el_tokens} tokens",
                    "scan": f"(c) scan, {s.scan_windows} windows of 64, batch {s.batch}",
                    "step": f"(c) unlearning loop (hinge), {s.step_forget} x {s.step_tokens} forget, "
                            f"{s.steps} steps timed"}
            bodies = {"score": lambda p: score_phase(p, model, counter, sizes, runtime, rng),
                      "el": lambda p: el_phase(p, model, counter, sizes, runtime, rng),
                      "scan": lambda p: scan_phase(p, model, tokenizer, counter, sizes, runtime, rng,
                                                   work),
                      "step": lambda p: step_phase(p, model, tokenizer, counter, sizes, runtime, rng,
                                                   work)}
            for name in wanted:  # the loop trains the model: it comes last
                phase = Phase(name, what[name])
                phases.append(run_phase(phase, lambda phase=phase, name=name: bodies[name](phase), runtime.device))
            counter.close()
        if "start_tflops_per_s" in peak.details:  # again at the end (a GPU's clocks, a CPU's other jobs change)
            rates = peak_matmul(runtime, sizes.matmul_n)
            peak.details["end_tflops_per_s"] = {n: r / 1e12 for n, r in rates.items()}
            best = max(*peak.details["start_tflops_per_s"].values(), *peak.details["end_tflops_per_s"].values())
            peak.details["tflops_per_s"] = best
            peak.what = f"{dtype} matmul peak (n <= {sizes.matmul_n}, fastest at start or end): {best:.3g} TFLOP/s"
            utilization(phases, best * 1e12, checked=cuda)
    passed = all(p.passed is not False for p in phases)
    seconds = time.perf_counter() - started
    kind = info.get("gpu") or f"CPU {info['cpu']} ({info['torch_threads']} torch threads)"
    print(f"# unmemorize GPU check: {kind}, runtime {runtime.describe()}, size {size_name}, "
          f"throughput model {args.shape}")
    print(f"torch {info['torch']}, transformers {info['transformers']}, python {info['python']}"
          + (f", CUDA {info['cuda']}" if cuda else ""))
    print()
    print(table(phases))
    print()
    print(f"{'all checks passed' if passed else 'CHECK FAILED'} in {seconds:.0f} s")
    for p in phases:
        if p.name == "unlearn" and p.details:
            print(f"unlearn: {p.details.get('stop_reason')} after {p.details.get('steps')} steps; extractable "
                  f"{p.details.get('extractable_before_after')}, loss-memorized "
                  f"{p.details.get('loss_memorized_before_after')}")
        if p.name == "parity" and p.details:
            d = p.details
            print(f"parity: {d['identical']} identical, {d['explained']} explained, {d['unexplained']} unexplained "
                  f"of {d['sequences']}; largest logit difference {d['max_logit_difference']:.3g}, "
                  f"{d['near_tie_positions']} near-tie positions")
    if args.json:
        report = {"passed": passed, "seconds": seconds, "size": size_name, "sizes": asdict(sizes),
                  "machine": info, "argv": sys.argv[1:] if argv is None else argv,
                  "phases": [asdict(p) for p in phases]}
        args.json.write_text(json.dumps(report, indent=1, default=str) + "\n")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
