"""Self-tests run by the module's Test class inside Slicer (and by pytest on slicer-core).

They use synthetic data and a known-answer predictor, so they need no downloads and no weights:
mask preview, prediction with glyphs landing at the right RAS position of an oblique LPS volume,
display controls, a tiny real model from a checkpoint, the Predict button's background prediction process, and a
background job that is cancelled.

Importing this file needs neither torch nor ``medgmae_core`` (the CTest of an extension build runs without them):
``run_self_tests(..., with_dependencies=False)`` runs only the tests that need neither.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np

from .display import add_volume, array_ijk
from .jobs import BackgroundJob, JobState, pid_alive, python_executable
from .logic import MedGMAELogic
from .parameters import Device, MedGMAEParameters, WindowMode


def rotation(axis, degrees: float) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = np.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def oblique_lps_affine() -> np.ndarray:
    """LPS-flipped, rotated 25 degrees about an oblique axis, anisotropic spacing (2, 1.5, 2.5 mm)."""
    a = np.eye(4)
    a[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ rotation([1, 2, 3], 25) @ np.diag([2.0, 1.5, 2.5])
    a[:3, 3] = [12.0, -30.0, 45.0]
    return a


def blob_volume(shape=(40, 36, 28), centre=(25.0, 12.0, 9.0), sigma: float = 2.0) -> np.ndarray:
    """Soft tissue (40 HU) with one bright blob (+400 HU) at a voxel position and a slab of air at i < 3."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    r2 = ((grid - np.asarray(centre)) ** 2).sum(-1)
    hu = 40.0 + 400.0 * np.exp(-r2 / (2 * sigma ** 2))
    hu[:3] = -1000.0
    return hu.astype(np.float32)


_classes: dict = {}


def __getattr__(name: str):
    """``BlobFinder`` is a torch module: its class is made on first use, so importing this file needs no torch."""
    if name == "BlobFinder":
        if name not in _classes:
            _classes[name] = _make_blob_finder()
        return _classes[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _make_blob_finder():
    import torch  # lazy: this file is imported without torch (the module's Test class without dependencies)

    class BlobFinder(torch.nn.Module):
        """A known-answer "model": one Gaussian at the centroid of the window's bright voxels."""

        def __init__(self, n: int = 32, scale: float = 0.03):
            super().__init__()
            self.config = SimpleNamespace(img_size=(n, n, n))
            self.scale = scale
            self.dummy = torch.nn.Parameter(torch.zeros(1))

        def predict_gaussians(self, x, mask_ratio=0.0, generator=None, **kwargs):
            from medgmae_core.gaussians import GaussianSet  # lazy: medgmae_core imports torch
            vol = x[0, 0].double()
            weights = (vol - vol.median()).clamp_min(0)  # above the soft-tissue background
            weights = weights * (weights >= 0.5 * weights.max())
            idx = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in vol.shape],
                                             indexing="ij"), -1)
            centre = (idx * weights[..., None]).sum((0, 1, 2)) / weights.sum() / (torch.tensor(vol.shape) - 1)
            return GaussianSet(centre.float().view(1, 1, 3), torch.full((1, 1, 3), self.scale),
                               torch.tensor([[[1.0, 0, 0, 0]]]), torch.ones(1, 1))

        def render(self, gaussians):
            from medgmae_core.render import render_volume  # lazy: medgmae_core imports torch
            return render_volume(gaussians, self.config.img_size, backend="torch")[:, None]

    return BlobFinder


def tiny_checkpoint(path: str | Path) -> Path:
    """A tiny randomly initialised MedGMAE saved through ``medgmae_core.train.checkpoint``."""
    import torch  # lazy: this file is imported without torch
    from medgmae_core.model import build_model, get_config  # lazy: medgmae_core imports torch
    from medgmae_core.train.checkpoint import save_checkpoint  # lazy: medgmae_core imports torch

    torch.manual_seed(0)
    config = get_config("tiny", img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=2, decoder_embed_dim=36,
                        decoder_depth=1, decoder_num_heads=2, num_gaussians=24, render_backend="torch")
    return save_checkpoint(path, model=build_model(config), config=config) or Path(path)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def test_mask_and_known_answer_glyphs(scene, report: Callable[[str], None] = print) -> None:
    from medgmae_core.export.glyphs import glyph_vertices  # lazy: medgmae_core imports torch

    affine = oblique_lps_affine()
    centre_ijk = np.array([25.0, 12.0, 9.0])
    volume = add_volume(scene, blob_volume(centre=centre_ijk), affine, "MedGMAE self-test CT")
    logic = MedGMAELogic(scene)
    preview = logic.preview_mask(volume, mask_ratio=0.5, patch_size=8, seed=1)
    hidden = preview.mask.astype(bool)
    _check(np.all(array_ijk(preview.masked_node)[hidden] == -1000.0), "hidden patches are not blanked")
    _check(0.3 < hidden.mean() < 0.7, f"hidden fraction {hidden.mean():.2f} far from the mask ratio 0.5")
    report("mask preview OK")
    truth = affine[:3, :3] @ centre_ijk + affine[:3, 3]
    blob_finder = __getattr__("BlobFinder")
    p = logic.predict(volume, model=blob_finder(), mode="point", point_ras=truth + [4.0, -3.0, 2.0])
    error = float(np.linalg.norm(p.centres_ras[0] - truth))
    _check(error < 1.0, f"glyph centre {p.centres_ras[0]} is {error:.2f} mm from the blob at {truth}")
    verts = glyph_vertices(p.model_node.GetPolyData(), resolution=p.glyph.resolution)
    _check(np.allclose(verts.mean(1)[0], p.centres_ras[0], atol=1e-3), "glyph model not centred on the Gaussian")
    report(f"glyph lands {error:.2f} mm from the known RAS position of an oblique LPS volume")
    logic.update_display(sigma=3, threshold=0.0, opacity=0.5)
    _check(p.model_node.GetDisplayNode().GetOpacity() == 0.5, "glyph opacity not applied")
    report("display controls OK")


def test_tiny_model_prediction(scene, report: Callable[[str], None] = print) -> None:
    volume = add_volume(scene, blob_volume(), oblique_lps_affine(), "MedGMAE self-test CT (model)")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = tiny_checkpoint(Path(tmp) / "tiny.pt")
        logic = MedGMAELogic(scene)
        p = logic.predict(volume, checkpoint=ckpt, mode="point", mask_ratio=0.5, seed=3)
    n = len(p.intensities)
    _check(n > 0 and p.table_node.GetNumberOfRows() == n, f"{n} Gaussians but {p.table_node.GetNumberOfRows()} rows")
    _check(p.prediction_node.GetImageData().GetDimensions() == (32, 32, 32), "prediction window is not 32^3")
    report(logic.status_text())


def test_background_prediction(scene, report: Callable[[str], None] = print) -> None:
    """The Predict button's path: a separate process (Slicer's Python) predicts, this process shows the result;
    it gives the same Gaussians as predicting in-process."""
    volume = add_volume(scene, blob_volume(), oblique_lps_affine(), "MedGMAE self-test CT (job)")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = tiny_checkpoint(Path(tmp) / "tiny.pt")
        logic = MedGMAELogic(scene)
        params = MedGMAEParameters(inputVolume=volume, checkpointPath=str(ckpt), maskRatio=0.5, seed=3, device="cpu")
        job = logic.start_prediction(params)
        result = job.wait_for_completion(timeout=600)
        _check(result.ok, f"the prediction process failed: {result.error}")
        stages = [e.get("stage") for e in result.events if e.get("event") == "progress"]
        _check("predicting" in stages, f"no progress reported by the prediction process: {stages}")
        shown = logic.finish_prediction(job, result)
        job_centres = logic.last_prediction.centres_ras.copy()
        in_process = logic.predict(volume, checkpoint=ckpt, mode="point", mask_ratio=0.5, seed=3, device="cpu")
    _check(job_centres.shape == in_process.centres_ras.shape and len(job_centres) > 0
           and np.allclose(job_centres, in_process.centres_ras, atol=1e-4),
           "the background prediction differs from the in-process one")
    report("background prediction OK: " + shown)


def test_background_job_cancel(report: Callable[[str], None] = print) -> None:
    code = ("import json, time\n"
            "for s in range(1, 1000):\n"
            "    print(json.dumps({'event': 'progress', 'step': s, 'total': 1000}), flush=True)\n"
            "    time.sleep(0.02)\n")
    job = BackgroundJob([python_executable(), "-c", code], name="self-test job").start()
    deadline = time.monotonic() + 60
    while len(job.events) < 3 and time.monotonic() < deadline:
        job.poll()
        time.sleep(0.02)
    steps = [e["step"] for e in job.events]
    _check(steps[:3] == [1, 2, 3], f"progress lines out of order: {steps[:5]}")
    pid = job.pid
    result = job.cancel(grace=3.0, wait=True)
    _check(result is not None and result.state == JobState.CANCELLED and not pid_alive(pid), "cancel did not end the job")
    report("background job: progress in order, cancelled")


def test_parameters_round_trip(scene, report: Callable[[str], None] = print) -> None:
    """The panel's parameters survive the scene's parameter node (no torch needed)."""
    node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "MedGMAE self-test parameters")
    params = MedGMAEParameters(maskRatio=0.5, windowMode=WindowMode.WHOLE, device=Device.CPU, checkpointPath="")
    params.write_to_node(node)
    back = MedGMAEParameters.read_from_node(node)
    scene.RemoveNode(node)
    _check(back == params, f"parameters changed on the way through the scene: {back} != {params}")
    report("parameters round trip OK")


def run_self_tests(scene, report: Callable[[str], None] = print, *, with_dependencies: bool = True) -> None:
    """All self-tests; ``with_dependencies=False`` runs only those that need neither torch nor medgmae_core."""
    if with_dependencies:
        test_mask_and_known_answer_glyphs(scene, report)
        test_tiny_model_prediction(scene, report)
        test_background_prediction(scene, report)
    test_parameters_round_trip(scene, report)
    test_background_job_cancel(report)
