"""Downstream segmentation: UNETR over the pre-trained encoder, fine-tuning, inference and evaluation.

``labels`` (label maps, class subsets), ``unetr`` (the network), ``transfer`` (loading pre-trained encoders);
fine-tuning as MAE splits entry point and engine: ``settings`` (``FinetuneSettings``, typed), ``transforms``
(the pipeline with a label key), ``cases`` (case sources, validation split, label fraction, per-step batches),
``finetune`` (the engine: network, layer-wise lr decay, the loop, validation, ``run``); ``segment`` (inference)
and ``evaluate`` (Dice, HD95). The command lines are in ``medgmae_core.commands``.
Submodules are imported on use so that ``import medgmae_core.seg`` stays light.
"""
