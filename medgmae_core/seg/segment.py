"""Segmenting a CT file or DICOM folder with a fine-tuned checkpoint (the library of ``medgmae segment``).

1. load (NIfTI via nibabel; NRRD/MHA/DICOM series via SimpleITK), check it is a CT;
2. the fine-tuning pipeline's deterministic part: RAS, the checkpoint's spacing, HU window;
3. sliding-window inference over the checkpoint's window with overlap (Gaussian blending);
4. argmax, then the label map is resampled back onto the input's exact grid and affine (nearest
   neighbour), written as NIfTI, with the label names in ``<out>.labels.json`` beside it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference

from ..data.readers import read_ct
from ..data.transforms import HU_WINDOW, check_resample_size, inference_transforms
from ..data.volumes import resample_nearest, write_nifti
from ..errors import StagedOutputs, make_output_dir
from ..train.checkpoint import load_checkpoint
from .labels import LabelMap, sidecar_path
from .unetr import SEG_TASK, UNETR, build_unetr


@dataclass
class Segmenter:
    """A fine-tuned UNETR with what inference needs: labels, spacing, window, HU window."""
    model: UNETR
    labels: LabelMap
    spacing_mm: tuple[float, float, float] | None
    hu_window: tuple[float, float]

    @property
    def roi_size(self) -> tuple[int, int, int]:
        return tuple(self.model.encoder_config.img_size)  # type: ignore[return-value]

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu") -> "Segmenter":
        ckpt = load_checkpoint(path, map_location="cpu")
        return cls.from_state(ckpt, origin=str(path), device=device)

    @classmethod
    def from_state(cls, ckpt: dict[str, Any], *, origin: str = "checkpoint",
                   device: str | torch.device = "cpu") -> "Segmenter":
        extra = ckpt.get("extra") or {}
        if extra.get("task") != SEG_TASK:
            raise ValueError(f"{origin} is not a fine-tuned segmentation checkpoint (it has no UNETR; "
                             "pre-trained encoders are fine-tuned first with `medgmae finetune`)")
        model = build_unetr(ckpt["model_config"], extra["architecture"])
        model.load_state_dict(ckpt["model"])
        model.to(device).eval()
        spacing = extra.get("spacing_mm")
        return cls(model, LabelMap.from_dict(extra["labels"], origin=f"{origin} labels"),
                   tuple(float(s) for s in spacing) if spacing else None,
                   tuple(float(w) for w in extra.get("hu_window", HU_WINDOW)))  # type: ignore[arg-type]

    # -------------------------------------------------------------- pipeline
    def load(self, path: str | Path):
        """The CT as loaded (MetaTensor ``[1, X, Y, Z]`` in HU on the file's grid), through the one reader every
        command uses (``data.readers.read_ct``: errors name the file, DICOM series are checked)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"input CT not found: {path}")
        array, affine = read_ct(path, what="input CT")
        meta = {"filename_or_obj": str(path), "original_affine": affine.copy(), "space": "RAS",
                "spatial_shape": np.asarray(array.shape), "original_channel_dim": "no_channel"}
        return MetaTensor(torch.from_numpy(np.ascontiguousarray(array))[None], affine=torch.as_tensor(affine),
                          meta=meta)

    def check_size(self, image, *, max_voxels: int | None = None, what: str = "input CT") -> tuple[int, int, int]:
        """The working grid's size at the checkpoint's spacing, refused above ``max_voxels`` or the memory
        (``data.transforms.check_resample_size``), before any work."""

        affine = np.asarray(image.affine, dtype=np.float64)
        classes = self.labels.num_classes
        return check_resample_size(tuple(image.shape[1:]), np.linalg.norm(affine[:3, :3], axis=0), self.spacing_mm,
                                   max_voxels=max_voxels, bytes_per_voxel=4.0 * (2 * classes + 4), what=what,
                                   spacing_option=None)  # the spacing is the checkpoint's

    def preprocess(self, image):
        """HU MetaTensor on its grid -> windowed MetaTensor in RAS at the model's spacing."""
        return inference_transforms(self.spacing_mm, load=False, window=self.hu_window)({"image": image})["image"]

    @torch.no_grad()
    def predict_logits(self, image: torch.Tensor, *, overlap: float = 0.5, sw_batch_size: int = 1) -> torch.Tensor:
        """Windowed ``[1, X, Y, Z]`` -> logits ``[C, X, Y, Z]`` by sliding-window inference."""
        device = next(self.model.parameters()).device
        x = torch.as_tensor(image, dtype=torch.float32).as_subclass(torch.Tensor)[None].to(device)  # [1, 1, X, Y, Z]
        logits = sliding_window_inference(x, self.roi_size, sw_batch_size, self.model, overlap=overlap,
                                          mode="gaussian", padding_mode="constant", cval=0.0)
        return logits[0].as_subclass(torch.Tensor) if hasattr(logits, "as_subclass") else logits[0]

    def segment_file(self, path: str | Path, *, overlap: float = 0.5, sw_batch_size: int = 1,
                     max_voxels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Label map ``[X, Y, Z]`` (uint8/uint16) on the input's own grid, and that grid's affine."""
        original = self.load(path)
        self.check_size(original, max_voxels=max_voxels, what=f"input CT {path}")
        return self.segment_image(original, overlap=overlap, sw_batch_size=sw_batch_size)

    def segment_image(self, original, *, overlap: float = 0.5, sw_batch_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`segment_file` for a CT already loaded with :meth:`load` (and checked with :meth:`check_size`)."""
        orig_affine = np.asarray(original.affine, dtype=np.float64)
        orig_shape = tuple(int(s) for s in original.shape[1:])
        image = self.preprocess(original)
        work_affine = np.asarray(image.affine, dtype=np.float64)
        labels = self.predict_logits(image, overlap=overlap, sw_batch_size=sw_batch_size).argmax(0)
        labels = labels.cpu().numpy().astype(np.uint8 if self.labels.num_classes <= 256 else np.uint16)
        back = resample_nearest(labels, work_affine, orig_shape, orig_affine, mode="nearest")
        return back, orig_affine


def segment(input_path: str | Path, checkpoint: str | Path, out: str | Path, *, overlap: float = 0.5,
            sw_batch_size: int = 1, device: str = "cpu", max_voxels: int | None = None,
            on_start=None) -> dict[str, Any]:
    """Segment ``input_path`` and write ``out`` (NIfTI) plus ``<out>.labels.json``; returns a summary.

    Every input is checked (checkpoint kind, the CT, the working grid's size) before ``on_start(**fields)`` is
    called (the CLI starts its progress reporting there); both outputs are written or neither
    (``errors.StagedOutputs``)."""

    t0 = time.time()
    out = Path(out)
    if not str(out).endswith((".nii", ".nii.gz")):
        raise ValueError(f"--out must be a NIfTI path (.nii or .nii.gz), got {out}")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give the label map's file name (e.g. {out / 'seg.nii.gz'})")
    if not Path(input_path).exists():
        raise FileNotFoundError(f"input CT not found: {input_path}")
    seg = Segmenter.from_checkpoint(checkpoint, device=device)
    original = seg.load(input_path)
    work_shape = seg.check_size(original, max_voxels=max_voxels, what=f"input CT {input_path}")
    if on_start is not None:
        on_start(input=str(input_path), checkpoint=str(checkpoint), shape=list(original.shape[1:]),
                 working_shape=list(work_shape))
    labels, affine = seg.segment_image(original, overlap=overlap, sw_batch_size=sw_batch_size)
    make_output_dir(out.parent)
    staged = StagedOutputs()
    try:
        write_nifti(labels, affine, staged.path(out))
        seg.labels.save_json(staged.path(sidecar_path(out)))
        staged.commit()
    finally:
        staged.discard()
    counts = {seg.labels.names[i]: int((labels == i).sum()) for i in seg.labels.ids}
    return {"output": str(out), "labels_json": str(sidecar_path(out)), "shape": list(labels.shape),
            "voxels": counts, "seconds": round(time.time() - t0, 2)}
