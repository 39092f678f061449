"""Relearning attacks: a few fine-tuning steps on some text, then audit the forget sequences not trained on.

Unlearning that only hides a sequence (suppresses it near the surface of the weights) lets it come back
after a little training; unlearning that removed it does not.

    relearn         train on a seeded half of the forget set (the first n // 2 of a seeded permutation), audit
                    the other half: related data brings the rest back.
    benign_relearn  train on text that is *not* the request (`benign_on`: the retain set, or the general text)
                    and audit the whole forget set: fine-tuning on unrelated or neighbouring text alone brings
                    forgotten data back (Lucki et al. 2024; Hu et al., ICLR 2025; Siddiqui et al. 2025).

Training is unmemorize.train.finetune (plain next-token loss, AdamW at a constant rate) on a deep copy of the
model, with the same budget for both (`relearn_steps`, `relearn_lr`, `relearn_batch`); the audit (EL off)
calibrates its band on the relearned model's own holdout.
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


def relearn_attack(ctx: AttackContext, benign: bool = False) -> dict:
    s = ctx.settings
    forget = ctx.sets["forget"]
    if benign:
        trained_name = s.benign_on or ("retain" if ctx.sets.get("retain") else "general")
        if not ctx.sets.get(trained_name):
            raise InputError(f"benign_relearn attack: needs a {trained_name} set to train on")
        trained, audited = ctx.sets[trained_name], forget
    else:
        if len(forget) < 2:
            raise InputError("relearn attack: needs at least 2 forget sequences (trains on half, audits the rest)")
        trained_idx, audited_idx = relearn_split(len(forget), s.seed)
        trained_name, trained, audited = "forget", [forget[i] for i in trained_idx], [forget[i] for i in audited_idx]
    batch = min(s.relearn_batch, len(trained))
    epochs = math.ceil(s.relearn_steps / math.ceil(len(trained) / batch))  # one step per epoch when batch = all
    model = ctx.weights_copy()
    losses = finetune(model, ctx.encode(trained, trained_name), epochs=epochs, max_steps=s.relearn_steps,
                      lr=s.relearn_lr, batch_size=batch, seed=s.seed, runtime=ctx.runtime, pad_id=ctx.pad_id,
                      description="benign relearn attack" if benign else "relearn attack")
    result = ctx.audit(model, {"forget": audited, "holdout": ctx.sets["holdout"]})
    del model
    rows = audit_rows(ctx, result, audited)
    trained_text = f"the {trained_name} set (not the request)" if benign else "a seeded half of the forget set"
    return {
        "description": f"Fine-tuned a copy for {len(losses)} steps (lr {s.relearn_lr}, batch {batch}) on "
                       f"{trained_text}, then audited (EL off) the forget sequences not trained on; the band is "
                       "recalibrated on the relearned model's holdout.",
        "settings": {"steps": s.relearn_steps, "lr": s.relearn_lr, "on": trained_name, "batch": batch,
                     "seed": s.seed},
        **counts(rows),
        "steps": len(losses),
        "losses": [round(loss, 6) for loss in losses],
        "trained_on": trained_name,
        "trained_ids": [] if benign else [seq.id for seq in trained],
        "trained_n": len(trained),
        "audited_ids": [seq.id for seq in audited],
        **holdout_summary(result),
        "sequences": rows,
    }
