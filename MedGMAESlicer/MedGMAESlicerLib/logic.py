"""The module's logic: plain Python over MRML nodes, callable headless (slicer-core) and from the app.

Every panel action is a method here with an ``interactive=False`` path (no dialogs, blocking jobs), so batch
scripts and tests drive the same code as the buttons. The numerical work is ``medgmae_core``'s: masking
(``model.vit.random_masking``), inference (``medgmae_core.inference``), coordinates (``medgmae_core.spatial``),
glyphs (``medgmae_core.export.glyphs``), PLY / NIfTI writers (``medgmae_core.export``). This file only moves
arrays in and out of MRML nodes.

Array order: ``slicer.util.arrayFromVolume`` gives ``[K, J, I]``; ``medgmae_core`` indexes volumes ``[i, j, k]``
with the node's IJKToRAS as affine, so arrays are transposed on the way in and out.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .parameters import MedGMAEParameters

log = logging.getLogger(__name__)

MASK_LABEL = 1  # label value of hidden patches


# ----------------------------------------------------------------------------- MRML helpers
def _slicer():
    import slicer
    return slicer


def ijk_to_ras(volume_node) -> np.ndarray:
    """The volume's 4x4 IJKToRAS matrix."""
    import vtk
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def set_ijk_to_ras(volume_node, affine: np.ndarray) -> None:
    import vtk
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(affine[r, c]))
    volume_node.SetIJKToRASMatrix(m)


def array_ijk(volume_node) -> np.ndarray:
    """Voxels as ``[I, J, K]`` (a view of the node's ``[K, J, I]`` array)."""
    if volume_node is None or volume_node.GetImageData() is None:
        raise ValueError("input volume: no volume selected, or the volume has no image data")
    return _slicer().util.arrayFromVolume(volume_node).transpose(2, 1, 0)


def add_volume(scene, array_ijk_: np.ndarray, affine: np.ndarray, name: str, *,
               class_name: str = "vtkMRMLScalarVolumeNode", node=None, parent_transform_id: str | None = None):
    """Create (or update ``node``) a volume node from an ``[I, J, K]`` array with the given IJKToRAS."""
    slicer = _slicer()
    if node is None or node.GetScene() is None:
        node = scene.AddNewNodeByClass(class_name, scene.GenerateUniqueName(name))
    set_ijk_to_ras(node, affine)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(np.asarray(array_ijk_).transpose(2, 1, 0)))
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    node.SetAndObserveTransformNodeID(parent_transform_id)
    return node


def set_slice_layers(scene, *, background=None, foreground=None, label=None, foreground_opacity: float | None = None,
                     label_opacity: float | None = None) -> int:
    """Show volumes in every slice view of the scene (what ``slicer.util.setSliceViewerLayers`` does).

    Works with the app's views and with headless slice views alike; returns the number of views updated
    (0 when the scene has no slice views, e.g. in a bare batch scene).
    """
    composites = [scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
                  for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode"))]
    for comp in composites:
        if background is not None:
            comp.SetBackgroundVolumeID(background.GetID())
        if foreground is not None:
            comp.SetForegroundVolumeID(foreground.GetID())
        if label is not None:
            comp.SetLabelVolumeID(label.GetID())
        if foreground_opacity is not None:
            comp.SetForegroundOpacity(float(foreground_opacity))
        if label_opacity is not None:
            comp.SetLabelOpacity(float(label_opacity))
    return len(composites)


# ----------------------------------------------------------------------------- masking
def patch_mask(shape_ijk, patch_size: int, mask_ratio: float, seed: int) -> np.ndarray:
    """Random patch mask over a volume, 1 = hidden, as ``[ceil(I/p), ceil(J/p), ceil(K/p)]`` uint8.

    The same MAE masking the model uses (``medgmae_core.model.vit.random_masking``, argsort of uniform noise),
    seeded, so a seed gives the same mask here and in prediction.
    """
    import torch
    from medgmae_core.model.vit import random_masking

    if int(patch_size) < 1:
        raise ValueError(f"patch size must be >= 1 voxel, got {patch_size}")
    grid = tuple(-(-int(n) // int(patch_size)) for n in shape_ijk)
    generator = torch.Generator().manual_seed(int(seed))
    tokens = torch.zeros(1, int(np.prod(grid)), 1)
    _, mask, _ = random_masking(tokens, float(mask_ratio), generator)
    return mask.reshape(grid).to(torch.uint8).numpy()


def voxel_mask(shape_ijk, patch_mask_: np.ndarray, patch_size: int) -> np.ndarray:
    """Patch grid mask -> voxel mask of ``shape_ijk`` (cropped at the volume edge)."""
    p = int(patch_size)
    full = patch_mask_.repeat(p, 0).repeat(p, 1).repeat(p, 2)
    return np.ascontiguousarray(full[: shape_ijk[0], : shape_ijk[1], : shape_ijk[2]])


@dataclass
class MaskPreview:
    masked_node: object
    label_node: object
    mask: np.ndarray  # [I, J, K] uint8, 1 = hidden
    fill_value: float

    @property
    def hidden_fraction(self) -> float:
        return float(self.mask.mean())


# ----------------------------------------------------------------------------- the logic
@dataclass
class Timings:
    values: dict[str, float] = field(default_factory=dict)

    def __call__(self, name: str):
        timings = self

        class _Timer:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timings.values[name] = time.perf_counter() - self.t0

        return _Timer()

    def text(self) -> str:
        return ", ".join(f"{k} {v:.2f} s" for k, v in self.values.items())


class MedGMAELogic:
    """All panel actions. ``scene`` defaults to ``slicer.mrmlScene`` (the app's, or the one a script set)."""

    def __init__(self, scene=None, *, log_callback: Callable[[str], None] | None = None) -> None:
        self._scene = scene
        self.log_callback = log_callback or log.info
        self.last_mask: MaskPreview | None = None

    @property
    def scene(self):
        return self._scene if self._scene is not None else _slicer().mrmlScene

    # ------------------------------------------------------------------ mask
    def preview_mask(self, volume_node, *, mask_ratio: float = 0.75, patch_size: int = 12, seed: int = 0,
                     show: bool = True, interactive: bool = False) -> MaskPreview:
        """A masked copy of ``volume_node`` (hidden patches set to the volume minimum) and a label map of the mask."""
        MedGMAEParameters(maskRatio=mask_ratio, patchSize=patch_size, seed=seed)  # range checks, named errors
        voxels = array_ijk(volume_node)
        mask = voxel_mask(voxels.shape, patch_mask(voxels.shape, patch_size, mask_ratio, seed), patch_size)
        fill = float(voxels.min())
        masked = np.where(mask.astype(bool), np.asarray(fill, dtype=voxels.dtype), voxels)
        affine = ijk_to_ras(volume_node)
        name = volume_node.GetName()
        reuse = self.last_mask if self.last_mask and self.last_mask.masked_node.GetScene() is self.scene else None
        masked_node = add_volume(self.scene, masked, affine, f"{name} masked",
                                 node=reuse.masked_node if reuse else None,
                                 parent_transform_id=volume_node.GetTransformNodeID())
        label_node = add_volume(self.scene, mask * MASK_LABEL, affine, f"{name} mask",
                                class_name="vtkMRMLLabelMapVolumeNode", node=reuse.label_node if reuse else None,
                                parent_transform_id=volume_node.GetTransformNodeID())
        if masked_node.GetDisplayNode() and volume_node.GetDisplayNode():
            source = volume_node.GetDisplayNode()
            masked_node.GetDisplayNode().SetAutoWindowLevel(False)
            masked_node.GetDisplayNode().SetWindowLevel(source.GetWindow(), source.GetLevel())
        if show:
            set_slice_layers(self.scene, background=masked_node, label=label_node, label_opacity=0.35)
        self.last_mask = MaskPreview(masked_node, label_node, mask, fill)
        self.log_callback(f"Masked {mask.mean():.0%} of {name} in {patch_size}-voxel patches (seed {seed}).")
        return self.last_mask

    def preview_mask_from_parameters(self, params: MedGMAEParameters, *, interactive: bool = False) -> MaskPreview:
        return self.preview_mask(params.inputVolume, mask_ratio=params.maskRatio, patch_size=params.patchSize,
                                 seed=params.seed, interactive=interactive)
