"""The pre-training engine (as MAE's ``engine_pretrain``): one optimiser step, and the stop request the loop polls.

``train.pretrain.run`` owns the run (settings, data, checkpoints, progress); this module owns what happens inside
one step: forward under autocast (the renderer stays fp32), backward, unscale, clip, optimiser and scheduler step.
"""
from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass
from typing import Any

import torch

from .optim import clip_gradients

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    loss: torch.Tensor        # this process's loss (detached by the caller for logging)
    grad_norm: torch.Tensor   # before clipping
    lr: float                 # the learning rate the step used
    updated: bool             # False: a non-finite gradient norm (no grad scaler), the update was skipped


def train_step(ddp_model, model, batch: torch.Tensor, generator: torch.Generator, *, optimizer, scheduler, scaler,
               clip_grad: float, amp_dtype: torch.dtype | None, device: torch.device) -> StepResult:
    """One optimiser step on ``batch`` with this step's mask ``generator``."""
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        loss = ddp_model(batch, generator=generator).loss
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    grad_norm = clip_gradients(model.parameters(), float(clip_grad))
    updated = True
    if scaler.is_enabled():
        scaler.step(optimizer)
    elif torch.isfinite(grad_norm):
        optimizer.step()
    else:  # identical on every rank: gradients are already averaged
        updated = False
    scaler.update()
    lr = optimizer.param_groups[0]["lr"]
    scheduler.step()
    return StepResult(loss, grad_norm, lr, updated)


class StopRequest:
    """SIGTERM / SIGINT set a flag; the loop finishes its step, saves a checkpoint and exits."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signal_name = signal.Signals(signum).name
        log.warning("%s received: finishing this step, saving a checkpoint, then stopping", self.signal_name)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __bool__(self) -> bool:
        return self.signal_name is not None
