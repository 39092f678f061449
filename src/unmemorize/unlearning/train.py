"""Plain causal-LM fine-tuning: the one training loop behind the victim, the oracle, task vectors and
relearning attacks.

For a batch of right-padded sequences the loss is the mean next-token negative log-likelihood over the
real (unpadded) target tokens:

    loss = - sum_{b,t} m[b,t] * log p(x[b,t] | x[b,<t]) / sum_{b,t} m[b,t]

with m the attention mask shifted by one (padding positions carry label -100 and never count).
"""

from __future__ import annotations

import math

import torch

from ..errors import InputError
from ..io.models import Runtime
from ..io.tokens import pad
from ..measure.scoring import forward_logits
from ..progress import progress

IGNORE = -100  # the label value cross_entropy skips


def finetune(model, token_lists: list[list[int]], *, epochs: int, lr: float, batch_size: int, seed: int,
             runtime: Runtime, pad_id: int, description: str = "fine-tuning",
             weight_decay: float = 0.0, max_steps: int | None = None) -> list[float]:
    """Fine-tune `model` in place on `token_lists` (each a list of token ids); return the loss of each step.

    AdamW at a constant learning rate; each epoch visits the sequences in a fresh order drawn from a
    torch.Generator seeded with `seed + epoch`, so the same seed gives the same run. `max_steps` ends the run
    after that many steps, inside an epoch if need be. The model is left in eval mode.
    """
    if not token_lists:
        raise InputError(f"{description}: nothing to train on (empty set)")
    if epochs < 0 or batch_size < 1 or lr < 0:
        raise InputError(f"{description}: need epochs >= 0, batch_size >= 1, lr >= 0")
    torch.manual_seed(seed)  # dropout, if the model has any
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    steps = epochs * math.ceil(len(token_lists) / batch_size)
    steps = steps if max_steps is None else min(steps, max_steps)
    losses: list[float] = []
    model.train()
    try:
        with progress(description, steps, status="loss -") as update:
            for epoch in range(epochs):
                generator = torch.Generator().manual_seed(seed + epoch)
                order = torch.randperm(len(token_lists), generator=generator).tolist()
                for start in range(0, len(order), batch_size):
                    if len(losses) == steps:
                        return losses
                    batch = [token_lists[i] for i in order[start : start + batch_size]]
                    input_ids, mask = pad(batch, pad_id, device=runtime.device)
                    labels = input_ids.masked_fill(mask == 0, IGNORE)
                    logits = forward_logits(model, input_ids, mask, runtime)
                    # position t predicts token t+1
                    loss = torch.nn.functional.cross_entropy(
                        logits[:, :-1].float().reshape(-1, logits.size(-1)),
                        labels[:, 1:].reshape(-1),
                        ignore_index=IGNORE,
                    )
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    losses.append(float(loss.detach()))
                    update(advance=1, status=f"loss {losses[-1]:.3f}")
    finally:
        model.eval()
    return losses
