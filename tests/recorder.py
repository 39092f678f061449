"""What the unlearning loop hands the optimizer at each step, and the batches of each forget loss."""

from __future__ import annotations

from torch.optim.optimizer import register_optimizer_step_pre_hook

from unmemorize.unlearning.methods.ascent import Ascent


class Recorder:
    """`steps`: per optimizer step {"weights", "grads", and each optimizer state in `state`}, as the step starts;
    `calls`: the (forget, retain) batches of every `Ascent.loss` call. `close()` removes the step hook."""

    def __init__(self, monkeypatch, state: tuple[str, ...] = ()) -> None:
        self.steps: list[dict] = []
        self.calls: list[tuple] = []
        original = Ascent.loss

        def loss(method, ctx, forget, retain):
            self.calls.append((forget, retain))
            return original(method, ctx, forget, retain)

        def before_step(optimizer, args, kwargs):
            params = [p for group in optimizer.param_groups for p in group["params"]]
            self.steps.append({"weights": [p.detach().clone() for p in params],
                               "grads": [p.grad.clone() for p in params],
                               **{key: [optimizer.state[p][key].clone() for p in params] for key in state}})

        monkeypatch.setattr(Ascent, "loss", loss)
        self.handle = register_optimizer_step_pre_hook(before_step)

    def close(self) -> None:
        self.handle.remove()
