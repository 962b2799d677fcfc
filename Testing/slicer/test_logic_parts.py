"""The module logic's parts, driven on their own: prediction (arrays, no scene), display (a real slicer-core MRML
scene, no model), background (command lines, no scene), and the facade that joins them."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import vtk

from MedGMAESlicerLib import background as background_module
from MedGMAESlicerLib import prediction as prediction_module
from MedGMAESlicerLib.background import BackgroundLogic
from MedGMAESlicerLib.display import (DisplayLogic, GlyphSettings, add_volume, array_ijk, ijk_to_ras,
                                      newest_point_ras, slice_composites)
from MedGMAESlicerLib.logic import MedGMAELogic
from MedGMAESlicerLib.parameters import Device, MedGMAEParameters, WindowMode
from MedGMAESlicerLib.prediction import (MaskedVolume, PredictionCancelled, PredictionLogic, PredictionOutput,
                                         PredictionRequest, patch_mask, voxel_mask)
from MedGMAESlicerLib.selftest import BlobFinder, blob_volume, oblique_lps_affine

LIB = Path(__file__).resolve().parents[2] / "MedGMAESlicer" / "MedGMAESlicerLib"
GRID_AFFINE = np.array([[2.0, 0, 0, 10.0], [0, 1.5, 0, -20.0], [0, 0, 1.0, 5.0], [0, 0, 0, 1]])


def canned_output(pred_affine=None) -> PredictionOutput:
    """Two Gaussians on a 33^3 grid: a bright one at normalised (0.5, 0.25, 0.75), i.e. voxel (16, 8, 24), and a
    faint one (5% of its intensity); isotropic scale 0.05 of the grid, no rotation."""
    return PredictionOutput(
        centres=np.array([[[0.5, 0.25, 0.75], [0.1, 0.1, 0.1]]], np.float32),
        scales=np.full((1, 2, 3), 0.05, np.float32),
        quaternions=np.array([[[1.0, 0, 0, 0], [1.0, 0, 0, 0]]], np.float32),
        intensities=np.array([[1.0, 0.05]], np.float32),
        pred=np.linspace(0.0, 1.0, 4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6),
        pred_affine=GRID_AFFINE if pred_affine is None else pred_affine, grid_shape=(33, 33, 33),
        grid_affine=GRID_AFFINE, mode="point", checkpoint="canned", timings={"predict": 0.5})


# ----------------------------------------------------------------------------- prediction part (no scene)
def test_prediction_part_masks_on_arrays():
    part = PredictionLogic()
    voxels = np.arange(30 * 20 * 10, dtype=np.float32).reshape(30, 20, 10) - 100.0
    masked = part.mask(voxels, mask_ratio=0.5, patch_size=8, seed=2)
    grid = patch_mask(voxels.shape, 8, 0.5, 2)
    assert grid.shape == (4, 3, 2) and grid.sum() == 12  # the model's masking: round(24 * 0.5) patches hidden
    assert np.array_equal(masked.mask, voxel_mask(voxels.shape, grid, 8)) and masked.mask.shape == voxels.shape
    hidden = masked.mask.astype(bool)
    assert masked.fill_value == -100.0 and np.all(masked.masked[hidden] == -100.0)
    assert np.array_equal(masked.masked[~hidden], voxels[~hidden])
    assert np.array_equal(part.mask(voxels, mask_ratio=0.5, patch_size=8, seed=2).mask, masked.mask)  # seeded
    assert not np.array_equal(part.mask(voxels, mask_ratio=0.5, patch_size=8, seed=3).mask, masked.mask)
    with pytest.raises(ValueError, match="parameter patchSize"):
        part.mask(voxels, patch_size=1)


def test_prediction_part_builds_checked_requests():
    part = PredictionLogic()
    hu = np.zeros((6, 5, 4), np.int16)
    request = part.request(hu, np.eye(4), checkpoint=Path(), mode=WindowMode.WHOLE, device=Device.CPU,
                           mask_ratio=0.5, seed=3, point_ras=[1, 2, 3])
    assert (request.checkpoint, request.mode, request.device, request.seed) == ("", "whole", "cpu", 3)
    assert request.hu.dtype == np.float32 and request.point_ras == (1.0, 2.0, 3.0)
    assert part.request(hu, np.eye(4), checkpoint="/w/c.pt").checkpoint == "/w/c.pt"
    with pytest.raises(ValueError, match="parameter windowMode"):
        part.request(hu, np.eye(4), mode="half")
    with pytest.raises(ValueError, match="parameter maskRatio"):
        part.request(hu, np.eye(4), mask_ratio=0.99)


def test_prediction_part_caches_the_model_per_file_and_device(tmp_path):
    calls = []

    def loader(path, device):
        calls.append((Path(path), device))
        return f"model {len(calls)}", "config", Path(path)

    part = PredictionLogic(loader=loader)
    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes(b"weights")
    assert part.load_model(ckpt, "cpu") == ("model 1", "config")
    assert part.load_model(str(ckpt), Device.CPU) == ("model 1", "config") and calls == [(ckpt, "cpu")]
    later = time.time() + 10
    os.utime(ckpt, (later, later))  # the file was replaced (e.g. training wrote a newer last.pt)
    assert part.load_model(ckpt, "cpu")[0] == "model 2" and part.model_path == ckpt and len(calls) == 2
    with pytest.raises(FileNotFoundError, match="does not exist"):
        part.load_model(tmp_path / "missing.pt")


def test_prediction_part_predicts_without_a_scene():
    from medgmae_core import spatial

    part = PredictionLogic(loader=lambda *args: pytest.fail("a model was given: nothing should be loaded"))
    affine, centre_ijk = oblique_lps_affine(), np.array([25.0, 12.0, 9.0])
    truth = affine[:3, :3] @ centre_ijk + affine[:3, 3]
    request = part.request(blob_volume(centre=centre_ijk), affine, point_ras=truth + [3.0, -2.0, 1.0])
    fractions = []
    output = part.predict(request, model=BlobFinder(), progress=lambda f, text: fractions.append(f))
    assert output.centres.shape == (1, 1, 3) and output.pred.shape == (32, 32, 32)
    assert "load model" not in output.timings and fractions == sorted(fractions) and fractions[-1] == 1.0
    centres_ras, _ = spatial.gaussians_to_world(output.gaussians(), output.grid_shape, output.grid_affine)
    assert np.linalg.norm(centres_ras[0] - truth) < 1.0


def test_prediction_part_job_files_and_discard():
    part = PredictionLogic()
    request = part.request(np.zeros((4, 4, 4)), np.eye(4), seed=5, mode="whole")
    job = part.start_job(request, volume_node="the CT", show={"prediction_opacity": 0.3}, start=False)
    ctx = job.context
    folder = ctx.output_path.parent
    try:
        assert job.argv[1:] == ["-u", "-m", "MedGMAESlicerLib.prediction", str(folder / "request.npz"),
                                str(ctx.output_path)] and job.cwd == str(folder)
        back = PredictionRequest.load(folder / "request.npz")
        assert (back.seed, back.mode) == (5, "whole")
        assert ctx.volume_node == "the CT" and ctx.show == {"prediction_opacity": 0.3}
    finally:
        part.discard(job)
    assert not folder.exists()
    part.discard(type("NoContext", (), {"context": None})())  # a job without files: nothing to do


def test_the_prediction_worker_never_imports_slicer(repo_root):
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import MedGMAESlicerLib.prediction, "
            "MedGMAESlicerLib.background; print(sorted(m for m in ('slicer', 'vtk', 'torch') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, str(repo_root / "MedGMAESlicer")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- display part (real MRML, no model)
def test_display_part_shows_a_prediction(session):
    ct = add_volume(session.scene, np.full((6, 5, 4), 40.0, np.float32), np.eye(4), "ct")
    display = DisplayLogic(session.scene)
    assert display.status_text() == "No prediction yet."
    with pytest.raises(ValueError, match="run Predict first"):
        display.update_display(opacity=0.2)
    p = display.show_prediction(ct, canned_output(), glyph=GlyphSettings(threshold=0.1), prediction_opacity=0.3)
    assert display.last_prediction is p and p.checkpoint == "canned"
    # the bright Gaussian at voxel (16, 8, 24) of the grid, in RAS through the grid's IJKToRAS; 1-sigma axes of
    # 0.05 * 32 voxels
    assert np.allclose(p.centres_ras[0], [2.0 * 16 + 10.0, 1.5 * 8 - 20.0, 1.0 * 24 + 5.0])
    table = p.table_node.GetTable()
    assert p.table_node.GetNumberOfRows() == 2 and p.table_node.GetNumberOfColumns() == 12
    assert [table.GetValueByName(0, c).ToDouble() for c in ("R (mm)", "A (mm)", "S (mm)")] == \
        pytest.approx([42.0, -8.0, 29.0])
    scales = sorted(table.GetValueByName(0, f"scale {k} (mm)").ToDouble() for k in (1, 2, 3))
    assert scales == pytest.approx([1.6, 2.4, 3.2])
    # only the bright Gaussian is at least 10% of the brightest: one sphere of resolution 8 (50 points)
    assert p.shown == 1 and p.model_node.GetPolyData().GetNumberOfPoints() == 50
    assert p.model_node.GetDisplayNode().GetOpacity() == pytest.approx(0.6)
    # the rendered prediction in HU, in the foreground of every slice view over the CT
    from medgmae_core.data.transforms import HU_WINDOW
    lo, hi = HU_WINDOW
    assert np.allclose(array_ijk(p.prediction_node), lo + canned_output().pred * (hi - lo), atol=1e-3)
    assert np.allclose(ijk_to_ras(p.prediction_node), GRID_AFFINE)
    composites = slice_composites(session.scene)
    assert len(composites) == 3 and all(c.GetForegroundVolumeID() == p.prediction_node.GetID()
                                        and c.GetBackgroundVolumeID() == ct.GetID()
                                        and c.GetForegroundOpacity() == pytest.approx(0.3) for c in composites)
    assert display.status_text().startswith("2 Gaussians predicted over one model window around the chosen point. "
                                            "1 are drawn")
    # display controls: every Gaussian drawn, at 3 sigma; a re-run on the same CT reuses the nodes
    display.update_display(threshold=0.0, sigma=3, opacity=0.25)
    assert p.shown == 2 and p.model_node.GetPolyData().GetNumberOfPoints() == 100
    assert p.model_node.GetDisplayNode().GetOpacity() == pytest.approx(0.25)
    nodes = session.scene.GetNumberOfNodes()
    again = display.show_prediction(ct, canned_output())
    assert again.model_node is p.model_node and again.table_node is p.table_node
    assert again.prediction_node is p.prediction_node and session.scene.GetNumberOfNodes() == nodes
    display.reset()
    assert display.last_prediction is None and display.last_mask is None


def test_display_part_shows_a_mask(session):
    ct = add_volume(session.scene, np.full((6, 5, 4), 40.0, np.float32), oblique_lps_affine(), "ct")
    mask = np.zeros((6, 5, 4), np.uint8)
    mask[:3] = 1
    masked = np.where(mask.astype(bool), np.float32(-5.0), np.float32(40.0))
    display = DisplayLogic(session.scene)
    preview = display.show_mask(ct, MaskedVolume(masked, mask, -5.0))
    assert np.array_equal(array_ijk(preview.masked_node), masked) and np.array_equal(array_ijk(preview.label_node), mask)
    assert preview.label_node.IsA("vtkMRMLLabelMapVolumeNode") and preview.hidden_fraction == 0.5
    assert np.allclose(ijk_to_ras(preview.masked_node), oblique_lps_affine())
    composite = slice_composites(session.scene)[0]
    assert composite.GetBackgroundVolumeID() == preview.masked_node.GetID()
    assert composite.GetLabelVolumeID() == preview.label_node.GetID()
    # a new mask of the same CT updates the same nodes; show=False leaves the views alone
    composite.SetBackgroundVolumeID(ct.GetID())
    again = display.show_mask(ct, MaskedVolume(masked[::-1].copy(), mask[::-1].copy(), -5.0), show=False)
    assert again.masked_node is preview.masked_node and np.array_equal(array_ijk(again.label_node), mask[::-1])
    assert composite.GetBackgroundVolumeID() == ct.GetID() and display.last_mask is again


def test_display_part_reads_the_newest_point_in_the_volumes_frame(session):
    ct = add_volume(session.scene, np.zeros((4, 4, 4), np.float32), np.eye(4), "ct")
    points = session.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "centre")
    assert newest_point_ras(points, ct) is None and newest_point_ras(None, ct) is None
    points.AddControlPoint([1.0, 2.0, 3.0])
    points.AddControlPoint([4.0, 5.0, 6.0])
    assert newest_point_ras(points, ct) == pytest.approx([4.0, 5.0, 6.0])
    transform = session.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 10.0)  # the CT is moved 10 mm to the right in the world
    transform.SetMatrixTransformToParent(shift)
    ct.SetAndObserveTransformNodeID(transform.GetID())
    assert newest_point_ras(points, ct) == pytest.approx([-6.0, 5.0, 6.0])  # the same point in the CT's own RAS


# ----------------------------------------------------------------------------- background part (no scene)
def test_background_part_writes_the_ct_through_its_writer(session, tmp_path):
    written = []

    def writer(node, path):
        written.append((node, Path(path)))
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(b"ct")
        return Path(path)

    ct = add_volume(session.scene, np.zeros((4, 4, 4), np.float32), np.eye(4), "ct")
    params = MedGMAEParameters(inputVolume=ct, reconOutputFolder=str(tmp_path / "r"), reconInit="fbp",
                               reconDevice="cpu", reconIterations=3)
    job = BackgroundLogic(ct_writer=writer).start_reconstruction_from_parameters(params, start=False)
    assert written == [(ct, tmp_path / "r" / "input_ct.nii.gz")]
    assert job.argv[job.argv.index("reconstruct") + 1] == str(tmp_path / "r" / "input_ct.nii.gz")
    assert job.argv[job.argv.index("--iters") + 1] == "3"
    with pytest.raises(ValueError, match="no CT writer"):
        BackgroundLogic().start_reconstruction_from_parameters(params, start=False)


def test_one_device_resolver(monkeypatch, tmp_path):
    """``resolve_device`` is defined once (prediction.py); the background part uses that one."""
    definitions = [path.name for path in sorted(LIB.glob("*.py"))
                   for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                   if isinstance(node, ast.FunctionDef) and node.name == "resolve_device"]
    assert definitions == ["prediction.py"]
    assert background_module.resolve_device is prediction_module.resolve_device
    assert not hasattr(BackgroundLogic, "resolve_device") and not hasattr(MedGMAELogic, "resolve_device")
    asked = []
    monkeypatch.setattr(background_module, "resolve_device", lambda device="auto": asked.append(device) or "cpu")
    BackgroundLogic().training_command(data_folder="phantom:1", out_dir=tmp_path, device="cuda")
    assert asked == ["cuda"]  # a GPU request is checked in Slicer, not in the child's log


# ----------------------------------------------------------------------------- the facade
class Recorder:
    """A part that records every call and returns the method's name."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        def method(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return name
        return method


def test_facade_forwards_to_its_parts():
    prediction, display, background = Recorder(), Recorder(), Recorder()
    logic = MedGMAELogic(prediction=prediction, display=display, background=background,
                         log_callback=lambda message: None)
    assert MedGMAELogic.__mro__ == (MedGMAELogic, object)  # composition, not inheritance
    assert logic.training_command(data_folder="d", out_dir="o") == "training_command"
    assert logic.run_reconstruction(out_dir="o", timeout=5) == "run_reconstruction"
    assert background.calls == [("training_command", (), {"data_folder": "d", "out_dir": "o"}),
                                ("run_reconstruction", (), {"out_dir": "o", "timeout": 5})]
    assert logic.export_ply("g.ply") == "export_ply" and logic.update_display(sigma=3) == "update_display"
    assert logic.status_text() == "status_text" and logic.write_input_ct("node", "ct.nii.gz") == "write_input_ct"
    assert logic.load_reconstruction_result("run") == "load_reconstruction_result" == logic.last_message
    assert [c[0] for c in display.calls] == ["export_ply", "update_display", "status_text", "write_input_ct",
                                             "load_reconstruction_result"]
    assert display.calls[1] == ("update_display", (), {"sigma": 3})
    logic.load_model("c.pt", "cpu")
    logic.discard_prediction("job")
    assert prediction.calls == [("load_model", ("c.pt", "cpu"), {}), ("discard", ("job",), {})]
    # the facade's methods show the part's signature and docstring
    assert MedGMAELogic.training_command.__doc__ == BackgroundLogic.training_command.__doc__
    # by default the background part writes a simulated scan's CT through the display part
    default = MedGMAELogic(scene=object())
    assert default.background.ct_writer == default.display.write_input_ct and default.scene is default.display.scene


class CannedPrediction:
    """A prediction part that returns a fixed output and records what it was asked."""

    def __init__(self):
        self.requests = []

    def request(self, hu, affine, **settings):
        self.requests.append((np.array(hu), np.array(affine), settings))
        return "the request"

    def predict(self, request, *, model=None, progress=None):
        assert request == "the request" and model is None
        progress(0.5, "predicting")
        return canned_output()


def test_facade_moves_the_ct_to_the_prediction_part_and_the_result_to_the_display(session):
    ct = add_volume(session.scene, blob_volume(shape=(6, 5, 4)), oblique_lps_affine(), "ct")
    said, fractions = [], []
    logic = MedGMAELogic(session.scene, prediction=CannedPrediction(), log_callback=said.append)
    p = logic.predict(ct, mode="whole", mask_ratio=0.5, seed=4, progress=lambda f, text: fractions.append(f))
    hu, affine, settings = logic.prediction.requests[0]
    assert np.array_equal(hu, array_ijk(ct)) and np.allclose(affine, oblique_lps_affine())
    assert settings == {"checkpoint": None, "mode": "whole", "point_ras": None, "mask_ratio": 0.5, "seed": 4,
                        "device": "auto"}
    assert fractions == pytest.approx([0.46, 0.92, 1.0])  # the part's progress scaled; glyphs; done
    assert p is logic.last_prediction is logic.display.last_prediction and p.prediction_node.GetScene() is session.scene
    assert said == [logic.display.status_text()] == [logic.last_message]
    # cancelled before the glyphs are built: the scene and the shown prediction stay as they were
    nodes = session.scene.GetNumberOfNodes()
    with pytest.raises(PredictionCancelled):
        logic.predict(ct, progress=lambda f, text: f >= 0.92)
    assert session.scene.GetNumberOfNodes() == nodes and logic.last_prediction is p
    logic.reset()
    assert logic.last_prediction is None and logic.last_message == ""


# ----------------------------------------------------------------------------- imports
LAZY_ALLOWED = {"torch", "medgmae_core", "slicer", "ctk", "qt", "vtk", "PyTorchUtils"}


def test_function_level_imports_are_only_the_lazy_ones_and_say_why():
    """In the module's files, an import inside a function is torch, medgmae_core (which imports torch), or an
    application module the file must load without, and a comment on it (or just above it) says why it is lazy."""
    files = sorted(LIB.glob("*.py")) + [LIB.parent / "MedGMAESlicer.py"]
    problems = []
    for path in files:
        lines = path.read_text(encoding="utf-8").splitlines()
        tree = ast.parse("\n".join(lines))
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        imports = {(n.lineno, n) for f in functions for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
        for lineno, node in sorted(imports, key=lambda item: item[0]):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or "."]
            roots = {name.split(".")[0] for name in names}
            if not roots <= LAZY_ALLOWED or getattr(node, "level", 0):
                problems.append(f"{path.name}:{lineno} imports {names} inside a function")
                continue
            # the import line, or the comment / import lines right above it, say "lazy"
            k, said = lineno - 1, False
            while k >= 0 and not said:
                text = lines[k].strip()
                said = "lazy" in text
                if k < lineno - 1 and not text.startswith(("#", "import ", "from ")):
                    break
                k -= 1
            if not said:
                problems.append(f"{path.name}:{lineno} lazy import of {names} without a comment saying why")
    assert problems == []
