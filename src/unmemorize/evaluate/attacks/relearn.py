"""Relearning attack: a few fine-tuning steps on related data, then audit what was not trained on.

Unlearning that only hides a sequence (suppresses it near the surface of the weights) lets it come back
after a little training on neighbouring data; unlearning that removed it does not. With relearn_on="forget",
a seeded half of the forget set (the first n // 2 of a seeded permutation) is trained on and the other half
is audited; with relearn_on="retain", the retain set is trained on and the whole forget set is audited.
Training is unmemorize.train.finetune (plain next-token loss, AdamW at a constant rate) on a deep copy of the
model; the audit (EL off) calibrates its band on the relearned model's own holdout.
"""

from __future__ import annotations

import math

import torch

from ...errors import InputError
from ...unlearning.train import finetune
from .common import AttackContext, audit_rows, counts, holdout_summary


def relearn_split(n: int, seed: int) -> tuple[list[int], list[int]]:
    """(trained, audited) forget indices: the first n // 2 of a seeded permutation, and the rest."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[: n // 2]), sorted(order[n // 2 :])


def relearn_attack(ctx: AttackContext) -> dict:
    s = ctx.settings
    forget = ctx.sets["forget"]
    if s.relearn_on == "forget":
        if len(forget) < 2:
            raise InputError("relearn attack: needs at least 2 forget sequences (trains on half, audits the rest)")
        trained_idx, audited_idx = relearn_split(len(forget), s.seed)
        trained, audited = [forget[i] for i in trained_idx], [forget[i] for i in audited_idx]
    else:
        if not ctx.sets.get("retain"):
            raise InputError("relearn attack with relearn_on=retain: needs a retain set")
        trained, audited = ctx.sets["retain"], forget
    batch = min(s.relearn_batch, len(trained))
    epochs = math.ceil(s.relearn_steps / math.ceil(len(trained) / batch))  # one step per epoch when batch = all
    model = ctx.weights_copy()
    losses = finetune(model, ctx.encode(trained, s.relearn_on), epochs=epochs, lr=s.relearn_lr, batch_size=batch,
                      seed=s.seed, runtime=ctx.runtime, pad_id=ctx.pad_id, description="relearn attack")
    result = ctx.audit(model, {"forget": audited, "holdout": ctx.sets["holdout"]})
    del model
    rows = audit_rows(ctx, result, audited)
    return {
        "description": f"Fine-tuned a copy for {len(losses)} steps (lr {s.relearn_lr}, batch {batch}) on "
                       + ("a seeded half of the forget set" if s.relearn_on == "forget" else "the retain set")
                       + ", then audited (EL off) the forget sequences not trained on; the band is recalibrated "
                       "on the relearned model's holdout.",
        "settings": {"steps": s.relearn_steps, "lr": s.relearn_lr, "on": s.relearn_on, "batch": batch,
                     "seed": s.seed},
        **counts(rows),
        "steps": len(losses),
        "losses": [round(loss, 6) for loss in losses],
        "trained_on": s.relearn_on,
        "trained_ids": [seq.id for seq in trained] if s.relearn_on == "forget" else [],
        "trained_n": len(trained),
        "audited_ids": [seq.id for seq in audited],
        **holdout_summary(result),
        "sequences": rows,
    }
