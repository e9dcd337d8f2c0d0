"""Stop a run whose trainable parameters get no gradient (qwen-merge overlay).

A frozen block in front of the trainable ones can cut the backward path without any error (e.g. reentrant
gradient checkpointing on inputs that do not require grad): the loss is logged, the gradient norm is exactly 0.0,
and days of GPU time train nothing. `ZeroGradientGuard` forces a log of the first `zero_grad_guard_steps` optimizer
steps and stops the run, with one line saying why, if every one of them had a gradient norm of exactly 0, or if
any of them had a non-finite loss or gradient norm (e.g. weights loaded as uninitialised memory). For those steps
it turns off the trainer's `logging_nan_inf_filter`, which would log a NaN loss as 0.0 or as the previous average.
Loss and gradient norm are global (all ranks log the same values), so every rank stops at the same step.

Registered for every `llamafactory-cli train` run by one line in `train/tuner.py`; `zero_grad_guard_steps: 0`
turns it off.
"""
from __future__ import annotations

import math

from transformers import TrainerCallback

from ..extras import logging

logger = logging.get_logger(__name__)


class ZeroGradientError(SystemExit):
    """Exits the training process with the message on stderr and no traceback."""


class ZeroGradientGuard(TrainerCallback):
    def __init__(self, steps: int = 3) -> None:
        self.steps = steps
        self.norms: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.nan_inf_filter = args.logging_nan_inf_filter
        args.logging_nan_inf_filter = False  # a NaN loss must reach on_log as NaN during the guarded steps

    def on_step_end(self, args, state, control, **kwargs):
        if len(self.norms) < self.steps:
            control.should_log = True  # the trainer passes the gradient norm only to a logging step
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if len(self.norms) >= self.steps or not logs or "grad_norm" not in logs:
            return
        norm, loss = float(logs["grad_norm"]), float(logs.get("loss", 0.0))
        self.norms.append(norm)
        if not (math.isfinite(norm) and math.isfinite(loss)):
            raise ZeroGradientError(
                f"zero-gradient guard: step {len(self.norms)} has a non-finite loss ({loss}) or gradient norm "
                f"({norm}), so this run would train on garbage; check the learning rate and the loaded weights "
                f"(set zero_grad_guard_steps: 0 to run anyway)")
        if len(self.norms) == self.steps:
            args.logging_nan_inf_filter = self.nan_inf_filter
        if len(self.norms) == self.steps and all(n == 0.0 for n in self.norms):
            raise ZeroGradientError(
                f"zero-gradient guard: the trainable parameters got a gradient norm of exactly 0 in each of the "
                f"first {self.steps} steps, so this run would train nothing; a frozen module in front of them cuts "
                f"the backward pass (check the freeze_* flags, gradient checkpointing and the DeepSpeed stage, or "
                f"set zero_grad_guard_steps: 0 to run anyway)")
        if len(self.norms) == self.steps:
            logger.info_rank0(f"zero-gradient guard: gradient norms of the first {self.steps} steps {self.norms}")
