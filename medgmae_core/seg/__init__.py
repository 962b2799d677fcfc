"""Downstream segmentation: UNETR over the pre-trained encoder, fine-tuning, inference and evaluation.

``labels`` (label maps, class subsets), ``io`` (volumes and grids), ``unetr`` (the network),
``transfer`` (loading pre-trained encoders), ``finetune`` / ``segment`` / ``evaluate`` (the CLI commands).
Submodules are imported on use so that ``import medgmae_core.seg`` stays light.
"""
