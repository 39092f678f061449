"""Methods by name: the registry.

A method file (`ascent.py`, `npo.py`, ...) declares a method class (its forget loss, what the loss averages
over, its options, optionally which parameters it trains) and `SPECS`, the names it goes by: for each a
one-line summary, the stages it runs, its selection (every forget sequence, only those still above the
band, or two-way: those pushed up and the over-unlearned pulled back), its default retain regularizer and its
default learning rate (`base.MethodSpec`). `gd` is `ga` + nll,
`ga_kl` is `ga` + kl, and so on; `--retain-loss` overrides the default of any of them, `--method-arg KEY=VALUE`
sets an option.

Adding a method: write `methods/<name>.py` with its class and SPECS, and add `*<name>.SPECS` below.
"""

from __future__ import annotations

from . import ascent, ce_u, hinge, idk, npo, rmu, satimp, simnpo, task_vector, undial, wga
from .base import ALL, BAND, TWO_WAY, GradientMethod, Method, MethodConfig, MethodSpec

METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in [
    *ascent.SPECS,
    *npo.SPECS,
    *idk.SPECS,
    *rmu.SPECS,
    *task_vector.SPECS,
    *simnpo.SPECS,
    *undial.SPECS,
    *wga.SPECS,
    *satimp.SPECS,
    *ce_u.SPECS,
    *hinge.SPECS,
]}

# The families of unlearning in the survey this project builds on (Liu et al. 2024, "Rethinking Machine
# Unlearning for LLMs"), and where each is in unmemorize: methods by name, or the options that make one
# (`--optimizer`, `--localize`, `--decoding` act with any method, or with none). `docs/methods.md` measures each.
FAMILIES: dict[str, tuple[tuple[str, ...], str]] = {
    "gradient ascent on the forget loss": (("ga", "gd", "ga_kl", "sga", "wga", "wga_gd", "satimp", "satimp_gd",
                                            "ce_u", "hinge"), ""),
    "preference optimization": (("npo", "npo_gd", "npo_kl", "simnpo", "simnpo_gd", "ssimnpo", "idk"), ""),
    "distillation": (("undial",), ""),
    "representation steering": (("rmu",), ""),
    "task arithmetic (weight space)": (("ta", "tau", "sgatau"), ""),
    "second-order optimization (SOUL)": ((), "--optimizer sophia, with any gradient method"),
    "localization, then unlearning": ((), "--localize causal:K (causal tracing; hinge's default: causal:6) or "
                                           "--mask-fraction F (gradient saliency), with any gradient method"),
    "input-based, weights unchanged": ((), "audit/attack --decoding icul:K | guardrail | input_filter: protects a "
                                            "deployment, not the weights"),
    "decoding-time guards, weights unchanged": ((), "audit/attack --decoding dpd | filter:N"),
}

__all__ = ["ALL", "BAND", "FAMILIES", "METHODS", "TWO_WAY", "GradientMethod", "Method", "MethodConfig", "MethodSpec"]
