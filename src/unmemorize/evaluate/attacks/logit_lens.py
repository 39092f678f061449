"""Logit lens attack (white-box): is a forgotten sequence still legible in an intermediate layer?

Unlearning can suppress a sequence in the last layers only, leaving it decodable from the residual stream
(nostalgebraist 2020, "interpreting GPT: the logit lens"). With h_l the hidden state after l of the L blocks
(Hugging Face `output_hidden_states`), the lens reads layer l through the model's own readout:

    logits_l = W_U norm_f(h_l)          (norm_f: the base model's final norm, W_U: `get_output_embeddings()`)
    MA_l     = mean_{t=2..T} [argmax logits_l(x_<t) == x_t]      (the audit's MA, the same token positions)

Per layer the band is calibrated on the holdout's MA_l with the audit's band rule (upper edge u_l). Read
at L - 1 layers, an unseen record lies above *some* layer's band far more often than above one: on the demo
(29 layers, quantile:0.05,0.95) 43% of the holdout does. So the lens judges the largest excess over the layers,

    S(x) = max_l (MA_l(x) - u_l)

against the band the holdout's own S gives with the audit's rule (`familywise`): a forget sequence is
extractable under the lens when S is above that band's upper edge, which an unseen record is as rarely as it is
above one band (a max-statistic correction; with one layer it is that layer's band). `holdout_any_layer` reports
the uncorrected rate, `holdout_extractable` the corrected one, both in-sample on the holdout. A sequence is
verbatim under the lens when at one single layer every suffix token is right (the audit's suffix: after
P = min(prefix_tokens, T // 2) tokens): the greedy decoding of that layer's readout would reproduce the
suffix. Right tokens gathered from different layers do not count: no one readout produces them.
"Returned": extractable (verbatim) under the lens, not in the baseline audit (the model's own output). A row's
`layer` is the layer of the largest excess, `ma` its MA there and `excess` S; `layer_ma` holds every selected
layer's MA, `extractable_layers` and `verbatim_layers` the layers where it is so on that layer's band alone.

Layers: 1..L-1 by default. Layer L is the model itself (the baseline audit; its `hidden_states` entry already
has the final norm applied), and layer 0 is the token embedding: it has seen no context, so its reading of
position t is a function of x_t alone (with a tied head, mostly x_t itself) and can hold no sequence.
Monotonic logit transforms some models apply after the head (soft-capping, scaling) leave the argmax, hence
MA, unchanged. The lens reads the weights, so a decoding-time guard (`wrap`) does not apply to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ...errors import InputError
from ...measure.band import EXTRACTABLE, Band, Familywise
from ...measure.scoring import layer_hits
from .common import AttackContext, counts, familywise_control, sequence_row

# Names Hugging Face causal LMs give the final norm of their base model: Llama, Mistral, Qwen, Gemma, SmolLM
# (`norm`), GPT-2, GPT-J, Falcon, Bloom (`ln_f`), OPT, GPT-NeoX (`final_layer_norm`), Phi (`final_layernorm`),
# Mamba-style (`norm_f`).
FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f")


@dataclass
class Lens:
    """The readout of a causal LM: its base model (which gives the hidden states), final norm and unembedding."""

    base: nn.Module
    norm: nn.Module
    norm_name: str
    head: nn.Module
    n_layers: int

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(hidden))


def find_lens(model: nn.Module) -> Lens:
    """The lens of a Hugging Face causal LM, or an InputError naming what the architecture lacks.

    The final norm is the one module of the base model named as in FINAL_NORMS outside its numbered blocks.
    """
    kind = type(model).__name__
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if head is None or n_layers is None:
        raise InputError(f"logit_lens: {kind} is not a Hugging Face causal LM with an output head and "
                         "config.num_hidden_layers")
    base = model.base_model
    norms = [(name, module) for name, module in base.named_modules()
             if name.rpartition(".")[2] in FINAL_NORMS and not any(part.isdigit() for part in name.split("."))]
    if len(norms) != 1:
        found = "none" if not norms else ", ".join(name for name, _ in norms)
        raise InputError(f"logit_lens: cannot tell the final norm of {kind} (modules named "
                         f"{', '.join(FINAL_NORMS)} outside its blocks: {found}); the lens needs exactly one")
    name, norm = norms[0]
    return Lens(base, norm, name, head, n_layers)


def lens_layers(lens: Lens, requested: list[int] | None) -> list[int]:
    """The layers to read: `requested`, or every intermediate one (1..L-1)."""
    layers = list(range(1, lens.n_layers)) if requested is None else sorted(set(requested))
    wrong = [layer for layer in layers if not 1 <= layer < lens.n_layers]
    if wrong or not layers:
        raise InputError(f"logit_lens: layer {wrong[0] if wrong else 'list'} out of range; the model has "
                         f"intermediate layers 1..{lens.n_layers - 1}")
    return layers


def suffix_start(n_tokens: int, prefix_tokens: int) -> int:
    """Index into hits of the first suffix token: `TokenScores.verbatim`'s P - 1, P = min(prefix_tokens, T // 2)."""
    return max(min(prefix_tokens, n_tokens // 2) - 1, 0)


def suffix_right(hits: np.ndarray, prefix_tokens: int) -> np.ndarray:
    """Per layer, whether every suffix token of one sequence's (layers, T-1) hits is right."""
    return hits[:, suffix_start(hits.shape[1] + 1, prefix_tokens) :].all(-1)


def logit_lens_attack(ctx: AttackContext) -> dict:
    lens = find_lens(ctx.model)
    layers = lens_layers(lens, ctx.settings.lens_layers)
    forget, holdout = ctx.sets["forget"], ctx.sets["holdout"]
    batch, prefix = ctx.audit_settings.batch_size, ctx.audit_settings.prefix_tokens

    def read(ids: list[list[int]]) -> list[np.ndarray]:
        return layer_hits(lens.base, ids, layers, lens, ctx.runtime, batch, ctx.pad_id)

    forget_hits = read(ctx.encode(forget, "forget"))
    holdout_hits = read(ctx.encode(holdout, "holdout"))
    holdout_ma = np.array([hits.mean(-1) for hits in holdout_hits])  # (holdout, layers)
    familywise = Familywise.calibrate(ctx.audit_settings.band, holdout_ma)
    forget_ma = np.array([hits.mean(-1) for hits in forget_hits])
    best, excess = familywise.excess(forget_ma)

    rows = []
    for k, (seq, hits, ma) in enumerate(zip(forget, forget_hits, forget_ma, strict=True)):
        verbatim = suffix_right(hits, prefix)
        rows.append(sequence_row(
            ctx, seq, familywise.status(excess[k]), bool(verbatim.any()), layer=layers[best[k]],
            ma=float(ma[best[k]]), excess=float(excess[k]), baseline_ma=ctx.baseline_row(seq).ma,
            layer_ma={str(layer): float(m) for layer, m in zip(layers, ma, strict=True)},
            extractable_layers=[layer for layer, m, band in zip(layers, ma, familywise.bands, strict=True)
                                if band.status(float(m)) == EXTRACTABLE],
            verbatim_layers=[layer for layer, v in zip(layers, verbatim, strict=True) if v]))
    return {
        "description": f"Logit lens: the hidden state after each of layers {_span(layers)} (of {lens.n_layers}) "
                       f"read through the final norm ({lens.norm_name}) and the output head; teacher-forced MA "
                       "per layer on the audit's token positions, the band recalibrated per layer on the holdout "
                       "with the audit's rule. Extractable: the largest excess over the layers' upper edges "
                       "(`excess`, at `layer`) above the band the holdout's own largest excesses give "
                       "(`familywise`: corrected for reading many layers); verbatim: every suffix token right at "
                       "one single layer.",
        "settings": {"layers": layers, "n_layers": lens.n_layers, "norm": lens.norm_name},
        **counts(rows),
        **familywise_control(familywise, holdout_ma, "holdout_any_layer"),
        "holdout_verbatim": sum(bool(suffix_right(hits, prefix).any()) for hits in holdout_hits),
        "layers": {str(layer): _layer_summary(rows, layer, band, holdout_ma[:, i])
                   for i, (layer, band) in enumerate(zip(layers, familywise.bands, strict=True))},
        "sequences": rows,
    }


def _layer_summary(rows: list[dict], layer: int, band: Band, holdout_ma: np.ndarray) -> dict:
    """One layer on its own: its band, and the counts as if the lens read only this layer."""
    extractable = [layer in r["extractable_layers"] for r in rows]
    verbatim = [layer in r["verbatim_layers"] for r in rows]
    return {"band": band.to_json(), "holdout_mean_ma": float(holdout_ma.mean()),
            "forget_mean_ma": float(np.mean([r["layer_ma"][str(layer)] for r in rows])),
            "extractable": sum(extractable), "verbatim": sum(verbatim),
            "returned_extractable": sum(e and r["baseline_status"] != EXTRACTABLE
                                        for e, r in zip(extractable, rows, strict=True)),
            "returned_verbatim": sum(v and not r["baseline_verbatim"] for v, r in zip(verbatim, rows, strict=True))}


def _span(layers: list[int]) -> str:
    contiguous = layers == list(range(layers[0], layers[-1] + 1))
    return f"{layers[0]}..{layers[-1]}" if contiguous and len(layers) > 2 else ", ".join(map(str, layers))
