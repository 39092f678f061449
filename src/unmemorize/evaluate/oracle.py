"""Comparison with an oracle: a model trained without the forget set, the gold standard unlearning imitates.

Three numbers, each asking "does the unlearned model treat the request like a model that never saw it?":

    forget_quality = KS-test p-value between the unlearned and the oracle's per-sequence forget losses
                     (TOFU's idea on our sequences: high means the two loss distributions are alike);
    privleak       = (auc - auc_oracle) / auc_oracle   (MUSE's idea), auc the membership AUC of forget vs
                     holdout; 0 is the oracle's leakage, > 0 leaks more, < 0 is over-unlearned;
    agreement      = share of forget sequences whose band status equals their status under the oracle.
"""

from __future__ import annotations

from scipy.stats import ks_2samp

from ..measure.audit import AuditResult

# MUSE measures PrivLeak with Min-K% Prob; the other scores are reported beside it.
PRIVLEAK_SCORE = "mink"


def oracle_report(unlearned: AuditResult, oracle: AuditResult) -> dict:
    """Both audits must cover the same forget and holdout sequences (each with its own band)."""
    mine = {r.id: r for r in unlearned.of("forget")}
    theirs = {r.id: r for r in oracle.of("forget")}
    if mine.keys() != theirs.keys():
        raise ValueError("the unlearned and oracle audits cover different forget sequences")
    ids = list(mine)
    test = ks_2samp([mine[i].loss for i in ids], [theirs[i].loss for i in ids])
    privleak = {name: (unlearned.privacy[f"{name}_auc"] - oracle.privacy[f"{name}_auc"]) / oracle.privacy[f"{name}_auc"]
                for name in ("loss", "zlib", "mink", "minkpp") if f"{name}_auc" in oracle.privacy}
    agree = sum(mine[i].status == theirs[i].status for i in ids)
    summary = oracle.summary("forget")
    return {
        "model": oracle.model,
        "forget_quality": float(test.pvalue),
        "ks_statistic": float(test.statistic),
        "privleak": privleak[PRIVLEAK_SCORE],
        "privleak_score": PRIVLEAK_SCORE,
        "privleak_by_score": privleak,
        # the same U-MIA (forget vs holdout) on the oracle: what "looks never trained" scores on this request
        "umia_auc": oracle.privacy.get("umia_auc"),
        "oracle_privacy": {k: v for k, v in oracle.privacy.items() if k != "roc"},
        "oracle_band": None if oracle.band is None else oracle.band.to_json(),
        "oracle_forget": {k: summary[k] for k in ("n", "mean_ma", "extractable", "verbatim", "over_unlearned",
                                                   "in_band", "mean_loss")},
        "status_agreement": agree / len(ids),
        "sequences": [{"id": i, "hash": mine[i].hash, "loss": mine[i].loss, "oracle_loss": theirs[i].loss,
                       "ma": mine[i].ma, "oracle_ma": theirs[i].ma, "status": mine[i].status,
                       "oracle_status": theirs[i].status} for i in ids],
    }
