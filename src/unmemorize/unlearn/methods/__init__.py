"""Methods by name. A method is a composition (SPEC): a forget objective, a selection (every forget sequence,
or only those still above the band), a default retain regularizer, and a default learning rate.
`gd` is `ga` + nll, `ga_kl` is `ga` + kl, and so on; `--retain-loss` overrides the default of any of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from .ascent import Ascent
from .idk import Idk
from .npo import NPO
from .rmu import RMU

ALL, BAND = "all", "band"


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    objective: str  # ascent | npo | idk | rmu | task_vector
    selection: str = ALL
    retain_loss: str = "none"
    lr: float = 2e-5


PRESETS = {p.name: p for p in [
    Preset("ga", "gradient ascent on every forget sequence (Jang et al. 2022)", "ascent"),
    Preset("gd", "gradient ascent on F + NLL on R (gradient difference)", "ascent", retain_loss="nll"),
    Preset("ga_kl", "gradient ascent on F + KL to the original model on R", "ascent", retain_loss="kl"),
    Preset("npo", "negative preference optimization against the original model (Zhang et al. 2024)", "npo",
           lr=2e-5),
    Preset("npo_gd", "NPO on F + NLL on R", "npo", retain_loss="nll"),
    Preset("npo_kl", "NPO on F + KL to the original model on R", "npo", retain_loss="kl"),
    Preset("idk", "train forget prefixes toward a neutral refusal, NLL on R (TOFU)", "idk", retain_loss="nll",
           lr=5e-5),
    Preset("rmu", "steer a middle layer's activations on F to a random direction, keep them on R (WMDP)", "rmu",
           lr=5e-5),
    Preset("sga", "selective gradient ascent: only sequences above the band get gradient (Barbulescu 2024)",
           "ascent", selection=BAND),
    Preset("ta", "task arithmetic: subtract lambda x the task vector of fine-tuning on F, lambda line-searched",
           "task_vector", lr=1e-4),
    Preset("tau", "task vector from the sequences above the band, smallest lambda reaching the target "
           "(Barbulescu 2024)", "task_vector", selection=BAND, lr=1e-4),
    Preset("sgatau", "sga, then tau on whatever is still above the band", "ascent", selection=BAND),
]}


def build_objective(preset: Preset, tokenizer):
    """The forget objective of a gradient method, with its default config."""
    if preset.objective == "ascent":
        return Ascent()
    if preset.objective == "npo":
        return NPO()
    if preset.objective == "idk":
        return Idk(tokenizer=tokenizer)
    if preset.objective == "rmu":
        return RMU()
    raise ValueError(f"{preset.name} is not a gradient method")
