"""Optimiser, learning-rate schedule and gradient clipping (MEDGMAE.md "Loss and optimisation").

AdamW with betas (0.9, 0.95) and weight decay 0.05, except on norms, biases and
tokens; linear warmup then cosine decay; gradients clipped at norm 1.0.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import nn

NO_DECAY_NAMES = ("cls_token", "query_tokens", "mask_token", "pos_embed", "position_embeddings")


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Parameter names excluded from weight decay: the model's own list if it has one, else
    every 1-D parameter (norms, biases) and every token / position embedding."""
    model = _unwrap(model)
    if hasattr(model, "no_weight_decay"):
        return set(model.no_weight_decay())
    return {name for name, p in model.named_parameters()
            if p.ndim <= 1 or any(token in name.rsplit(".", 1)[-1] for token in NO_DECAY_NAMES)}


def param_groups(model: nn.Module, weight_decay: float, *, lr: float | None = None,
                 layer_of: Callable[[str], int] | None = None, top_layer: int = 0,
                 layer_decay: float = 1.0) -> list[dict]:
    """AdamW groups over the trainable parameters, the one weight-decay rule (``no_weight_decay_names``).

    Without ``layer_of``: two groups, decayed weights and the rest. With ``layer_of`` (parameter name -> layer id,
    ``top_layer`` the highest): layer-wise lr decay, one group per (layer, decayed or not) with
    ``lr * layer_decay^(top_layer - layer)`` (and its ``lr_scale`` and ``layer``), sorted by layer."""
    model = _unwrap(model)
    skip = no_weight_decay_names(model)
    if layer_of is None:
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                (no_decay if name in skip else decay).append(p)
        return [{"params": decay, "weight_decay": float(weight_decay)}, {"params": no_decay, "weight_decay": 0.0}]
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = layer_of(name)
        no_decay = name in skip
        scale = layer_decay ** (top_layer - layer)
        g = groups.setdefault((layer, no_decay), {
            "params": [], "weight_decay": 0.0 if no_decay else float(weight_decay),
            "lr": lr * scale, "lr_scale": scale, "layer": layer})
        g["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(model: nn.Module, lr: float = 1e-4, weight_decay: float = 0.05,
                    betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.AdamW:
    if not lr > 0:
        raise ValueError(f"learning rate must be positive, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"weight decay must be >= 0, got {weight_decay}")
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas))


class WarmupCosine:
    """LR multiplier: linear warmup over ``warmup_steps`` (from 1/warmup), then cosine down to ``min_ratio``.

    A plain callable object, so ``LambdaLR.state_dict()`` stores (and restores) its settings.
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> None:
        if total_steps < 1:
            raise ValueError(f"total steps must be >= 1, got {total_steps}")
        if warmup_steps < 0:
            raise ValueError(f"warmup steps must be >= 0, got {warmup_steps}")
        if not 0.0 <= min_ratio <= 1.0:
            raise ValueError(f"min lr ratio must be in [0, 1], got {min_ratio}")
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.min_ratio = float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                    min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup + cosine ``LambdaLR``, stepped once per optimiser step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup_steps, total_steps, min_ratio))


def clip_gradients(parameters: Iterable[torch.nn.Parameter], max_norm: float = 1.0) -> torch.Tensor:
    """Clip the global gradient norm to ``max_norm`` (<= 0: no clipping); returns the norm before clipping."""
    params = [p for p in parameters if p.grad is not None]
    if max_norm <= 0:
        if not params:
            return torch.zeros(())
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    return torch.nn.utils.clip_grad_norm_(params, max_norm)
