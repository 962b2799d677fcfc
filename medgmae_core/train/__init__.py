"""Training: the one checkpoint format, optimiser and schedule, distributed helpers, ``medgmae pretrain``.

Import submodules directly (``medgmae_core.train.checkpoint`` ...); this package keeps
imports light so ``load_model`` is cheap for the CLI and Slicer.
"""
from .checkpoint import FORMAT, CheckpointError, load_checkpoint, load_model, save_checkpoint

__all__ = ["FORMAT", "CheckpointError", "load_checkpoint", "load_model", "save_checkpoint"]
