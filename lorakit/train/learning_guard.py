"""A run that learned nothing is a failure: `LearningGuard` checks that the adapter moves.

Without it a run whose gradients never reach the adapter (a frozen adapter, a kernel without a backward, every
label masked) or whose learning rate is 0 throughout "finishes" with the base model's behaviour and an adapter
of zeros. The checks cost one host sync per optimizer step for the first few steps, and one comparison of the
trainable weights at the end (their copy from the start is dropped as soon as they are seen to move).

- before training: the model has trainable parameters (`check_trainable`).
- the first `EARLY_STEPS` optimizer steps (SFT): some gradient is non-zero, and a step taken with a non-zero
  gradient at a non-zero learning rate changed the weights; else the run stops there. GRPO skips this check:
  groups whose rewards are all equal give a zero gradient, legitimately, early in a run.
- the end of training: the trainable weights differ from those at the start.
`problem` names what went wrong and the likely causes; lorakit.train.run turns it into an error (exit 1).
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from lorakit.errors import EXIT_RUNTIME, LorakitError

EARLY_STEPS = 3
CAUSES = ("likely causes: a learning rate of 0 for the whole run; every label masked (-100), so no token "
          "gives a loss; a frozen adapter (no parameter requires a gradient); or a kernel without autograd "
          "support that cuts the gradient on its way to the adapter")


def _trainable(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def _local(t):
    """The local shard of a DTensor (FSDP2), else the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def check_trainable(model) -> None:
    """Raise (exit 1) when no parameter of `model` requires a gradient: training could change nothing."""
    if not _trainable(model):
        raise LorakitError("the adapter is frozen: no parameter of the model requires a gradient, so training "
                           "would change nothing", exit_code=EXIT_RUNTIME, hint=CAUSES)


class LearningGuard(TrainerCallback):
    """Stop a run whose adapter does not move (see the module docstring); `problem` says why, else None."""

    def __init__(self, early: bool = True) -> None:
        self.early = early
        self.problem: str | None = None
        self.grad_seen = False  # some gradient was non-zero (or not finite: NonFiniteGuard's business)
        self.moved = False
        self._start: list | None = None
        self._params: list = []
        self._lr = 0.0
        self._nonzero = False
        self._steps = 0  # optimizer steps of this process (a resumed run counts from its checkpoint)
        self.lr_steps = 0  # of them, taken at a non-zero learning rate

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._params = _trainable(model) if model is not None else []
        with torch.no_grad():
            self._start = [_local(p.detach()).clone() for p in self._params]
        return control

    def _changed(self) -> bool:
        if not self._start:
            return False
        with torch.no_grad():
            diff = [torch.ne(_local(p.detach()), s).any() for p, s in zip(self._params, self._start)]
            return bool(torch.stack(diff).any())

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self._lr = max((g.get("lr", 0.0) for g in optimizer.param_groups), default=0.0) if optimizer else 0.0
        self.lr_steps += self._lr > 0
        if self.moved or self._steps >= EARLY_STEPS or not self.early:
            return control
        grads = [_local(p.grad) for p in self._params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else None
        self.grad_seen |= norm is not None and bool(norm != 0)  # NaN counts as seen: NonFiniteGuard's case
        self._nonzero = norm is not None and bool(torch.isfinite(norm) & (norm > 0))
        return control

    def on_optimizer_step(self, args, state, control, **kwargs):
        stepped = any(p.grad is not None for p in self._params)  # NonFiniteGuard's skip drops the gradients
        if self.early and not self.moved and self._nonzero and self._lr > 0 and stepped:
            self.moved = self._changed()
            if self.moved:
                self._start = None  # no longer needed: give the memory back
            else:
                self._stop(control, "a step with a non-zero gradient and learning rate left the adapter unchanged")
        self._nonzero = False
        return control

    def on_step_end(self, args, state, control, **kwargs):
        self._steps += 1
        last = state.max_steps and state.global_step >= state.max_steps
        if self.early and not self.grad_seen and (self._steps >= EARLY_STEPS or last):
            self._stop(control, f"every gradient of the adapter was zero (or missing) in the first "
                                f"{self._steps} optimizer step(s)")
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.problem is None and not self.moved and self._steps > 0 and self._start is not None:
            self.moved = self._changed()
            if not self.moved and not self.lr_steps:
                self.problem = f"the learning rate was 0 at every one of the {self._steps} step(s)" + (
                    " (a run of one step spends it warming up: set train.warmup_ratio: 0)" if self._steps == 1 else "")
            elif not self.moved:
                self.problem = f"training ran {self._steps} step(s) and the adapter's weights did not change"
        self._start = None
        return control

    def _stop(self, control, problem: str) -> None:
        if self.problem is None:
            self.problem = problem
        control.should_training_stop = True
        control.should_save = False

    def error(self) -> LorakitError | None:
        """The run's failure (exit 1) when the adapter did not move, else None."""
        if self.problem is None:
            return None
        return LorakitError(f"the run learned nothing: {self.problem}", exit_code=EXIT_RUNTIME, hint=CAUSES)
