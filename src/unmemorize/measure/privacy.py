"""Membership-inference AUCs: how well each score separates the forget set from the holdout.

Scores are oriented so that "higher means member": lower loss, lower zlib ratio, higher Min-K% and
Min-K%++, lower loss than the original model (`ref`). An AUC near 1 means the forget set is still
recognisably trained on, near 0.5 indistinguishable from unseen data, far below 0.5 recognisably
*unlearned*; `umia_auc` = max(auc, 1 - auc) of the loss attack catches both directions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

# name -> sign that makes the score "higher means member"
ORIENTATION = {"loss": -1.0, "zlib": -1.0, "mink": 1.0, "minkpp": 1.0, "ref": -1.0}
BOOTSTRAP_ROUNDS = 1000


def auc(members: Sequence[float], nonmembers: Sequence[float]) -> float:
    labels = np.r_[np.ones(len(members)), np.zeros(len(nonmembers))]
    return float(roc_auc_score(labels, np.r_[members, nonmembers]))


def bootstrap_interval(members: Sequence[float], nonmembers: Sequence[float], seed: int = 0,
                       two_sided: bool = False) -> list[float]:
    """95% percentile interval, resampling each group on its own (the forget set is small).

    The AUC of each resample is the share of (member, non-member) pairs ordered right, ties counting half
    (the Mann-Whitney form of the ROC AUC), computed for many resamples at once.
    """
    rng = np.random.default_rng(seed)
    members, nonmembers = np.asarray(members, dtype=float), np.asarray(nonmembers, dtype=float)
    chunk = max(1, int(2e7 // (len(members) * len(nonmembers))))
    values = []
    for start in range(0, BOOTSTRAP_ROUNDS, chunk):
        rounds = min(chunk, BOOTSTRAP_ROUNDS - start)
        m = rng.choice(members, (rounds, len(members)))
        n = rng.choice(nonmembers, (rounds, len(nonmembers)))
        diff = m[:, :, None] - n[:, None, :]
        values.append(((diff > 0) + 0.5 * (diff == 0)).mean(axis=(1, 2)))
    aucs = np.concatenate(values)
    if two_sided:
        aucs = np.maximum(aucs, 1 - aucs)
    low, high = np.percentile(aucs, [2.5, 97.5])
    return [float(low), float(high)]


def privacy_report(forget: dict[str, Sequence[float]], holdout: dict[str, Sequence[float]],
                   seed: int = 0) -> dict:
    """AUCs with bootstrap intervals and ROC points for every score present in both sets."""
    report: dict = {}
    roc: dict = {}
    for name, sign in ORIENTATION.items():
        if name not in forget or name not in holdout:
            continue
        members, nonmembers = sign * np.asarray(forget[name]), sign * np.asarray(holdout[name])
        report[f"{name}_auc"] = auc(members, nonmembers)
        report[f"{name}_auc_ci"] = bootstrap_interval(members, nonmembers, seed)
        labels = np.r_[np.ones(len(members)), np.zeros(len(nonmembers))]
        fpr, tpr, _ = roc_curve(labels, np.r_[members, nonmembers])
        roc[name] = {"fpr": fpr.round(6).tolist(), "tpr": tpr.round(6).tolist()}
    loss_auc = report["loss_auc"]
    members, nonmembers = -np.asarray(forget["loss"]), -np.asarray(holdout["loss"])
    report["umia_auc"] = max(loss_auc, 1 - loss_auc)
    report["umia_auc_ci"] = bootstrap_interval(members, nonmembers, seed, two_sided=True)
    report["roc"] = roc
    return report
