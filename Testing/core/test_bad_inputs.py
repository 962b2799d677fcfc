"""Bad inputs and faults, for every command: one clear line, exit code 2, a JSON ``error`` event, nothing left behind.

The table follows MONAI's bad-argument tests: a list of ``(command, input, expected)`` cases fed to
``pytest.mark.parametrize``. Each case runs the command through ``cli.main`` with ``--progress-json`` and asserts:

* exit code 2 and no traceback;
* exactly one ``medgmae COMMAND: error: ...`` line on stderr (nothing else but log warnings), naming the file or
  parameter (``expected``);
* stdout is pure JSON lines ending in exactly one ``error`` event with the same message;
* no output folder or file is left behind (the folder is absent or empty) and no temporary file anywhere.

Then the faults: a DICOM series with a missing slice, the size guard, a read-only output location, a full disk,
stale checkpoint temp files, wrong-kind checkpoints, damaged PLYs and projections, and the demo's NIfTI outputs on
the input's exact grid and affine (LPS oblique and anisotropic inputs). Inputs are tiny; models are untrained and
small (48^3 windows), so the whole module runs in a few minutes on 2 busy cores.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medgmae_core import cli, errors
from medgmae_core.data.phantom import make_phantom

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CT_SHAPE = (24, 22, 16)
CT_SPACING = 3.0


# ----------------------------------------------------------------------------- helpers
def write_nifti(path: Path, array, affine=None) -> Path:
    affine = np.diag([CT_SPACING] * 3 + [1.0]) if affine is None else affine
    img = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    nib.save(img, str(path))
    return path


def phantom_hu(shape=CT_SHAPE, spacing=CT_SPACING) -> np.ndarray:
    return make_phantom(shape=shape, spacing_mm=spacing, seed=0).hu.astype(np.float32)


def temp_leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if errors.is_temp_name(p.name))


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_clean_failure(command: str, code: int, out: str, err: str, expected: str | tuple[str, ...]) -> str:
    """Exit 2, one error line naming ``expected`` (every string of it), one JSON error event; returns the line."""
    assert code == 2, (code, err[-2000:])
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    error_lines = [ln for ln in lines if ln.startswith(f"medgmae {command}: error: ")]
    assert len(error_lines) == 1, lines
    assert all(ln.startswith(("WARNING", "INFO")) for ln in lines if ln not in error_lines), lines
    line = error_lines[0]
    for needle in (expected,) if isinstance(expected, str) else expected:
        assert needle in line, (needle, line)
    events = [json.loads(ln) for ln in out.splitlines() if ln.strip()]  # every stdout line must be JSON
    kinds = [e["event"] for e in events]
    assert kinds.count("error") == 1 and kinds[-1] == "error", kinds
    assert events[-1]["message"] == line.split(": error: ", 1)[1]
    return line


def assert_nothing_left(root: Path, out: Path) -> None:
    assert not out.exists() or (out.is_dir() and not any(out.iterdir())), list(out.iterdir())
    assert temp_leftovers(root) == []


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bad_inputs")


@pytest.fixture(scope="module")
def weights(work) -> Path:
    """An untrained tiny MedGMAE (48^3 windows): a pre-training checkpoint."""
    from medgmae_core.model import build_model, get_config
    from medgmae_core.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    return save_checkpoint(work / "models" / "tiny48.pt", model=build_model(get_config("tiny", img_size=48)))


@pytest.fixture(scope="module")
def seg_checkpoint(work) -> Path:
    """An untrained tiny UNETR saved the way `medgmae finetune` saves it: a segmentation checkpoint."""
    from medgmae_core.model import get_config
    from medgmae_core.seg.labels import LabelMap
    from medgmae_core.seg.unetr import UNETR
    from medgmae_core.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    cfg = get_config("tiny", img_size=48)
    model = UNETR(cfg, 2, feature_size=8)
    extra = {"task": "segmentation", "architecture": model.architecture(), "labels": LabelMap({1: "organ"}).to_dict(),
             "spacing_mm": [6.0, 6.0, 6.0], "hu_window": [-175.0, 250.0]}
    return save_checkpoint(work / "models" / "seg.pt", model=model, config=cfg, extra=extra)


@pytest.fixture(scope="module")
def good_ply(work) -> Path:
    from medgmae_core.export.ply import write_gaussians_ply
    from medgmae_core.gaussians import GaussianSet

    gs = GaussianSet.random(1, 8, sigma_range=(0.05, 0.1), generator=torch.Generator().manual_seed(0))
    return write_gaussians_ply(work / "models" / "good.ply", gs, shape=(12, 12, 10),
                               ijk_to_ras=np.diag([2.0, 2.0, 3.0, 1.0]))


def _dicom_with_unreadable_slice(root: Path, shared_ct: Path, keep: float | int = 1000,
                                 name: str = "dicom_gap") -> tuple[Path, str]:
    """A copy of the real 20-slice DICOM series with slice 8 truncated to ``keep`` bytes (or that fraction).

    GDCM leaves such a file out of the series and the other 19 would stack at an averaged 2.111 mm. (Cut in its
    header, GDCM skips it at once; cut in half, GDCM spends seconds on it, so the table uses the former.)"""
    folder = root / name
    shutil.copytree(shared_ct / "totalsegmentator" / "example_ct_dicom", folder)
    victim = sorted(folder.iterdir())[7]
    data = victim.read_bytes()
    victim.write_bytes(data[: int(keep * len(data)) if isinstance(keep, float) else keep])
    return folder, victim.name


@pytest.fixture(scope="module")
def bad(work, shared_ct) -> dict[str, tuple[Path, str]]:
    """Every bad input: ``name -> (path, what the error line must name)``."""
    root = work / "inputs"
    root.mkdir()
    hu = phantom_hu()
    out: dict[str, tuple[Path, str]] = {}

    good = write_nifti(root / "good.nii.gz", hu)
    raw = good.read_bytes()
    (root / "truncated.nii.gz").write_bytes(raw[: len(raw) * 2 // 3])
    out["truncated"] = (root / "truncated.nii.gz", "truncated.nii.gz")
    (root / "empty.nii.gz").write_bytes(b"")
    out["empty file"] = (root / "empty.nii.gz", "empty.nii.gz")
    (root / "notes.nii.gz").write_text("this is not an image\n")
    out["text file"] = (root / "notes.nii.gz", "notes.nii.gz")
    out["2D image"] = (write_nifti(root / "flat2d.nii.gz", hu[:, :, 0]), "flat2d.nii.gz")
    out["4D image"] = (write_nifti(root / "four_d.nii.gz", np.stack([hu] * 3, axis=-1)), "four_d.nii.gz")
    nan = hu.copy()
    nan[4:8, 4:8, 4:8] = np.nan
    out["NaN"] = (write_nifti(root / "nan.nii.gz", nan), "nan.nii.gz")
    inf = hu.copy()
    inf[0, 0, 0] = np.inf
    out["inf"] = (write_nifti(root / "inf.nii.gz", inf), "inf.nii.gz")
    out["constant"] = (write_nifti(root / "constant.nii.gz", np.full(CT_SHAPE, -1000.0, np.float32)),
                       "constant.nii.gz")
    out["1x5x5"] = (write_nifti(root / "one_slice.nii.gz", hu[:1, :5, :5]), "one_slice.nii.gz")
    (root / "empty_folder").mkdir()
    out["empty folder"] = (root / "empty_folder", "empty_folder")
    (root / "no_images").mkdir()
    (root / "no_images" / "README.txt").write_text("no images here\n")
    out["folder without images"] = (root / "no_images", "no_images")
    big = phantom_hu((64, 60, 40))  # at 100 mm: over 100 M voxels at 6 mm (the tests' spacing) and at 1.5 mm
    out["100 mm spacing"] = (write_nifti(root / "spacing100.nii.gz", big, np.diag([100.0, 100.0, 100.0, 1.0])),
                             "spacing100.nii.gz")
    folder, victim = _dicom_with_unreadable_slice(root, shared_ct)
    out["DICOM missing slice"] = (folder, victim)
    return out


def command_argv(command: str, path: Path, out: Path, models: dict[str, Path]) -> tuple[list[str], Path]:
    """The command line running ``command`` on ``path``, and the output location it would write."""
    if command == "demo":
        return ["demo", str(path), "--out", str(out), "--weights", str(models["weights"]), "--spacing", "6"], out
    if command == "segment":
        return ["segment", str(path), "--checkpoint", str(models["seg"]), "--out", str(out / "seg.nii.gz"),
                "--device", "cpu"], out
    if command == "reconstruct":
        return ["reconstruct", str(path), "--out", str(out), "--views", "3", "--iters", "1"], out
    if command == "render":
        return ["render", str(models["ply"]), "--like", str(path), "--out", str(out / "render.nii.gz")], out
    if command == "pretrain":
        return ["pretrain", "--data", str(path), "--out-dir", str(out), "--steps", "1", "--batch-size", "1",
                "--img-size", "48", "--model", "tiny", "--num-workers", "0", "--spacing-mm", "6"], out
    if command == "finetune":
        return ["finetune", "--case", str(path), str(path), "--classes", "1", "--out", str(out), "--steps", "1",
                "--roi", "48", "--spacing", "6", "--device", "cpu"], out
    if command == "evaluate":
        return ["evaluate", "--pred", str(path), "--ref", str(path), "--out", str(out / "metrics.json")], out
    raise AssertionError(command)


# Which bad input is bad for which command (a --like CT only lends its grid to `render`; `evaluate` reads label
# maps; `reconstruct` and `render` do not resample, so a 100 mm spacing is fine for them).
READ_FAILURES = ["truncated", "empty file", "text file", "2D image", "4D image", "empty folder",
                 "folder without images", "DICOM missing slice"]
CT_CONTENT = ["NaN", "inf", "constant", "1x5x5"]
BAD_FOR = {
    "demo": READ_FAILURES + CT_CONTENT + ["100 mm spacing"],
    "segment": READ_FAILURES + CT_CONTENT + ["100 mm spacing"],
    "pretrain": READ_FAILURES + CT_CONTENT + ["100 mm spacing"],
    "finetune": READ_FAILURES + CT_CONTENT + ["100 mm spacing"],
    "reconstruct": READ_FAILURES + CT_CONTENT,
    "render": READ_FAILURES + ["1x5x5"],
    "evaluate": READ_FAILURES,
}
TABLE = [(command, name) for command, names in BAD_FOR.items() for name in names]


@pytest.mark.parametrize("command,bad_input", TABLE, ids=[f"{c}-{n}" for c, n in TABLE])
def test_every_command_rejects_every_bad_input(command, bad_input, bad, weights, seg_checkpoint, good_ply, work,
                                               tmp_path, capsys):
    path, names = bad[bad_input]
    out = tmp_path / "out"
    argv, out_location = command_argv(command, path, out, {"weights": weights, "seg": seg_checkpoint,
                                                           "ply": good_ply})
    code, stdout, stderr = run(argv + ["--progress-json"], capsys)
    expected = names if not (bad_input == "100 mm spacing" and command in ("demo", "segment")) else (
        names, "--max-voxels")
    assert_clean_failure(command, code, stdout, stderr, expected)
    assert_nothing_left(tmp_path, out_location)
    assert temp_leftovers(work / "inputs") == []


# ----------------------------------------------------------------------------- one real process
def test_segment_bad_image_in_a_real_process(bad, seg_checkpoint, tmp_path):
    """The reported failure, end to end: exit status 2 and exactly one stderr line, no traceback."""
    path, name = bad["text file"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "medgmae_core.cli", "segment", str(path), "--checkpoint",
                           str(seg_checkpoint), "--out", str(tmp_path / "seg.nii.gz"), "--progress-json"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("medgmae segment: error: ") and name in lines[0], lines
    events = [json.loads(ln) for ln in proc.stdout.splitlines()]
    assert events[-1]["event"] == "error" and name in events[-1]["message"]
    assert not (tmp_path / "seg.nii.gz").exists()


# ----------------------------------------------------------------------------- wrong-kind checkpoints and files
@pytest.fixture(scope="module")
def recon_checkpoint(work) -> Path:
    path = work / "models" / "recon_checkpoint.pt"
    torch.save({"format": "medgmae-recon-checkpoint/1", "iteration": 3, "params": {}}, path)
    return path


@pytest.fixture(scope="module")
def small_ct(work) -> Path:
    return write_nifti(work / "models" / "small_ct.nii.gz", phantom_hu())


@pytest.fixture(scope="module")
def projections(work, small_ct) -> Path:
    from medgmae_core.recon.projection_file import save_projections
    from medgmae_core.recon.simulation import simulate_from_ct

    return save_projections(work / "models" / "scan.npz", simulate_from_ct(small_ct, downsample=2, views=6))


def _npz_variant(src: Path, dst: Path, **changes) -> Path:
    z = dict(np.load(src))
    z.update(changes)
    np.savez(dst, **z)
    return dst


WRONG = [  # (name, argv builder, what the line must say)
    ("seg checkpoint to demo",
     lambda m, o: ["demo", "--out", str(o), "--weights", str(m["seg"])],
     ("seg.pt", "segmentation (finetune) checkpoint", "`medgmae demo` needs a pre-training checkpoint")),
    ("seg checkpoint to reconstruct --init medgmae",
     lambda m, o: ["reconstruct", str(m["scan"]), "--out", str(o), "--init", "medgmae", "--checkpoint", str(m["seg"]),
                   "--iters", "1"],
     ("seg.pt", "segmentation (finetune) checkpoint", "needs a pre-training checkpoint")),
    ("recon checkpoint to demo",
     lambda m, o: ["demo", "--out", str(o), "--weights", str(m["recon"])],
     ("recon_checkpoint.pt", "reconstruction checkpoint")),
    ("pre-training checkpoint to segment",
     lambda m, o: ["segment", str(m["ct"]), "--checkpoint", str(m["weights"]), "--out", str(o / "s.nii.gz")],
     ("tiny48.pt", "not a fine-tuned segmentation checkpoint")),
    ("projection angles in degrees",
     lambda m, o: ["reconstruct", str(_npz_variant(m["scan"], o.parent / "deg.npz",
                                                   angles=np.rad2deg(np.load(m["scan"])["angles"]))),
                   "--out", str(o), "--iters", "1"],
     ("deg.npz", "angles", "degrees")),
    ("projection angles all zero",
     lambda m, o: ["reconstruct", str(_npz_variant(m["scan"], o.parent / "zero.npz",
                                                   angles=np.zeros(6))), "--out", str(o), "--iters", "1"],
     ("zero.npz", "all 6 angles are 0")),
    ("render --shape with a PLY that has its own grid",
     lambda m, o: ["render", str(m["ply"]), "--shape", "8,8,8", "--out", str(o / "r.nii.gz")],
     ("--shape", "conflicts with the grid stored in the PLY")),
    ("render --shape and --like",
     lambda m, o: ["render", str(m["ply"]), "--shape", "8,8,8", "--like", str(m["ct"]), "--out", str(o / "r.nii.gz")],
     ("--shape and --like",)),
    ("demo --max-voxels too small",
     lambda m, o: ["demo", "--out", str(o), "--weights", str(m["weights"]), "--phantom-shape", "40,40,32",
                   "--max-voxels", "1000"],
     ("built-in phantom", "--max-voxels", "M voxels")),
    ("demo --spacing 0",
     lambda m, o: ["demo", "--out", str(o), "--weights", str(m["weights"]), "--spacing", "0"], ("--spacing",)),
]


@pytest.mark.parametrize("name,make_argv,expected", WRONG, ids=[w[0] for w in WRONG])
def test_wrong_kind_checkpoints_and_bad_parameters(name, make_argv, expected, weights, seg_checkpoint,
                                                   recon_checkpoint, projections, small_ct, good_ply, tmp_path,
                                                   capsys):
    models = {"weights": weights, "seg": seg_checkpoint, "recon": recon_checkpoint, "scan": projections,
              "ct": small_ct, "ply": good_ply}
    out = tmp_path / "out"
    command = make_argv(models, out)[0]
    code, stdout, stderr = run(make_argv(models, out) + ["--progress-json"], capsys)
    line = assert_clean_failure(command, code, stdout, stderr, expected)
    assert len(line) < 600 and "state_dict" not in line  # no wall of weight names
    assert_nothing_left(tmp_path, out)


def _ply_with(path: Path, good: Path, field: str, value: float, vertex: int = 2) -> Path:
    from medgmae_core.export.ply import _parse_header

    raw = good.read_bytes()
    with open(good, "rb") as fh:
        count, dtype, _ = _parse_header(fh, good)
        offset = fh.tell()
    data = np.frombuffer(raw[offset:], dtype=dtype, count=count).copy()
    data[field][vertex] = value
    path.write_bytes(raw[:offset] + data.tobytes())
    return path


PLY_CASES = [
    ("NaN centre", "x", np.nan, ("vertex 2", "x = nan")),
    ("inf intensity", "intensity", np.inf, ("vertex 2", "intensity")),
    ("huge scale", "scale_1", 80.0, ("vertex 2", "scale_1")),
    ("zero scale", "scale_0", -80.0, ("vertex 2", "scale_0")),
    ("zero quaternion", "rot_0", 0.0, ("vertex 2", "quaternion")),
]


@pytest.mark.parametrize("name,field,value,expected", PLY_CASES, ids=[c[0] for c in PLY_CASES])
def test_render_rejects_damaged_ply_fields(name, field, value, expected, good_ply, tmp_path, capsys):
    ply = _ply_with(tmp_path / "bad.ply", good_ply, field, value)
    if field == "rot_0":
        for f in ("rot_1", "rot_2", "rot_3"):
            ply = _ply_with(ply, ply, f, 0.0)
    code, stdout, stderr = run(["render", str(ply), "--out", str(tmp_path / "o" / "r.nii.gz"), "--progress-json"],
                               capsys)
    assert_clean_failure("render", code, stdout, stderr, ("bad.ply",) + expected)
    assert_nothing_left(tmp_path, tmp_path / "o")


def test_truncated_ply_is_named(good_ply, tmp_path, capsys):
    raw = good_ply.read_bytes()
    (tmp_path / "cut.ply").write_bytes(raw[: len(raw) - 20])
    code, stdout, stderr = run(["render", str(tmp_path / "cut.ply"), "--out", str(tmp_path / "r.nii.gz"),
                                "--progress-json"], capsys)
    assert_clean_failure("render", code, stdout, stderr, ("cut.ply", "truncated"))


# ----------------------------------------------------------------------------- DICOM series with a missing slice
def test_dicom_series_with_a_missing_slice(bad, shared_ct, tmp_path):
    from medgmae_core.data.readers import read_image
    from medgmae_core.errors import InputError

    half, half_victim = _dicom_with_unreadable_slice(tmp_path, shared_ct, keep=0.5, name="half")
    for folder, victim in (bad["DICOM missing slice"], (half, half_victim)):
        with pytest.raises(InputError) as info:
            read_image(folder, what="CT")
        message = str(info.value)
        assert victim in message and "could not be read" in message and "--resample-dicom" in message
        assert "not uniform" in message and "about 1 slice(s) missing" in message
    folder, victim = bad["DICOM missing slice"]

    # the same series with the slice deleted (nothing unreadable): the gap alone is refused
    deleted = tmp_path / "deleted"
    shutil.copytree(shared_ct / "totalsegmentator" / "example_ct_dicom", deleted)
    (deleted / victim).unlink()
    with pytest.raises(InputError, match=r"slice spacing is not uniform \(2 mm, but 4 mm between"):
        read_image(deleted, what="CT")

    # --resample-dicom: the readable slices go back onto the intact series' grid; the known slices are exact
    intact, intact_affine = read_image(shared_ct / "totalsegmentator" / "example_ct_dicom")
    from medgmae_core.data.readers import read_dicom_series, SimpleITKReader

    reader = SimpleITKReader()
    array, meta = reader.get_data(read_dicom_series(folder, resample=True))
    assert array.shape == intact.shape == (512, 512, 20)
    np.testing.assert_allclose(meta["affine"], intact_affine, atol=1e-4)
    k = int(np.argmax([np.abs(array[..., k] - intact[..., k]).max() for k in range(20)]))
    known = [i for i in range(20) if i != k]
    np.testing.assert_array_equal(array[..., known], intact[..., known].astype(np.float32))
    assert 0 < k < 19  # the interpolated slice is the missing one, between its neighbours
    lo, hi = np.minimum(intact[..., k - 1], intact[..., k + 1]), np.maximum(intact[..., k - 1], intact[..., k + 1])
    assert np.all((array[..., k] >= lo - 1e-3) & (array[..., k] <= hi + 1e-3))


def test_dicom_gap_with_resample_flag_runs_render_like(bad, good_ply, tmp_path, capsys):
    """`--resample-dicom` turns the refusal into a warning and a uniform grid (render --like is the cheap user)."""
    folder, _ = bad["DICOM missing slice"]
    out = tmp_path / "r.nii.gz"
    code, _, err = run(["render", str(good_ply), "--like", str(folder), "--out", str(out), "--resample-dicom"],
                       capsys)
    assert code == 0, err
    img = nib.load(str(out))
    assert img.shape == (512, 512, 20)
    np.testing.assert_allclose(np.linalg.norm(img.affine[:3, :3], axis=0), [0.9765625, 0.9765625, 2.0], atol=1e-4)


# ----------------------------------------------------------------------------- size guard
def test_size_guard_estimates_before_working(caplog):
    from medgmae_core.data.transforms import DEFAULT_MAX_VOXELS, check_resample_size
    from medgmae_core.errors import SizeLimitError

    # the inputs: 122x101x30 at 100 mm and at 10 mm, to 1.5 mm
    with pytest.raises(SizeLimitError, match=r"ct\.nii\.gz.*--max-voxels"):
        check_resample_size((122, 101, 30), (100.0, 100.0, 100.0), 1.5, what="ct.nii.gz")
    with pytest.raises(SizeLimitError, match=r"8\d\dx6\d\dx19\d = 10\d\.\d M voxels"):
        check_resample_size((122, 101, 30), (10.0, 10.0, 10.0), 1.5, what="ct.nii.gz")
    assert DEFAULT_MAX_VOXELS == 100_000_000
    # an explicit --max-voxels is the override; upsampling more than 2x per axis warns
    with caplog.at_level("WARNING"):
        shape = check_resample_size((122, 101, 30), (10.0, 10.0, 10.0), 1.5, max_voxels=200_000_000, what="ct")
    assert shape == (808, 668, 194)  # (n - 1) * 10 / 1.5 + 1, corner-aligned like prepare_ct
    assert sum("upsampling axis" in r.getMessage() for r in caplog.records) == 3
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert check_resample_size((100, 100, 50), (1.0, 1.0, 3.0), 1.5, what="ct") == (67, 67, 99)
    assert not [r for r in caplog.records if "upsampling" in r.getMessage()]  # 2x exactly: no warning
    with pytest.raises(SizeLimitError, match="memory available"):  # the memory estimate is checked too
        check_resample_size((100, 100, 100), (1.5, 1.5, 1.5), 1.5, bytes_per_voxel=1e9, what="ct")


def test_demo_refuses_a_huge_grid_before_creating_its_folder(bad, weights, tmp_path, capsys):
    path, name = bad["100 mm spacing"]
    out = tmp_path / "out"
    code, stdout, stderr = run(["demo", str(path), "--out", str(out), "--weights", str(weights), "--progress-json"],
                               capsys)
    line = assert_clean_failure("demo", code, stdout, stderr, (name, "--max-voxels", "1.5 mm"))
    assert "M voxels" in line and "GB" in line
    assert not out.exists()


# ----------------------------------------------------------------------------- output location faults
OUTPUT_COMMANDS = ["demo", "segment", "render", "reconstruct", "pretrain", "finetune", "evaluate"]


@pytest.mark.parametrize("command", OUTPUT_COMMANDS)
def test_output_under_a_regular_file_is_one_line(command, weights, seg_checkpoint, good_ply, small_ct, tmp_path,
                                                 capsys, work):
    """Tests run as root (chmod does not stop root), so the unwritable location is a path below a regular file."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder\n")
    argv, _ = command_argv(command, small_ct, blocker / "out", {"weights": weights, "seg": seg_checkpoint,
                                                                 "ply": good_ply})
    if command == "pretrain":
        argv[argv.index("--data") + 1] = "phantom:1"
        argv += ["--phantom-shape", "48"]
    if command == "finetune":
        label = write_nifti(tmp_path / "label.nii.gz", (phantom_hu() > 0).astype(np.uint8))
        argv[argv.index("--case") + 2] = str(label)
    if command == "evaluate":
        label = write_nifti(tmp_path / "label.nii.gz", (phantom_hu() > 0).astype(np.uint8))
        argv[argv.index("--pred") + 1] = argv[argv.index("--ref") + 1] = str(label)
    code, stdout, stderr = run(argv + ["--progress-json"], capsys)
    assert_clean_failure(command, code, stdout, stderr, ("blocker",))
    assert blocker.read_text() == "a file, not a folder\n"
    assert temp_leftovers(tmp_path) == []


@pytest.mark.parametrize("err,words", [(errno.EROFS, "read-only file system"), (errno.EACCES, "permission denied"),
                                       (errno.ENOSPC, "disk full")])
def test_demo_write_fault_leaves_no_partial_outputs(err, words, weights, tmp_path, capsys, monkeypatch):
    """A fault on the fourth output (the scene): nothing is in --out afterwards, and the line says so."""
    from medgmae_core.export import slicer_scene

    def failing_scene(path, **kwargs):
        Path(path).with_name("_tmp20260101ABCDEF").mkdir()  # what slicer-core leaves on a failed write
        Path(path).write_bytes(b"partial")
        raise OSError(err, os.strerror(err), str(path))

    monkeypatch.setattr(slicer_scene, "write_scene", failing_scene)
    out = tmp_path / "out"
    code, stdout, stderr = run(["demo", "--out", str(out), "--weights", str(weights), "--phantom-shape", "40,40,32",
                                "--progress-json"], capsys)
    line = assert_clean_failure("demo", code, stdout, stderr, ("scene.mrb", words, "no demo outputs were written"))
    assert str(out) in line
    assert_nothing_left(tmp_path, out)


def test_pretrain_disk_full_is_named_and_cleaned(tmp_path, capsys, monkeypatch):
    """A full disk while saving a checkpoint: torch says "unexpected pos"; we say the disk is full. Uses a real
    small tmpfs when this process may mount one, else the same torch failure with the free space mocked."""
    import shutil as _shutil

    from medgmae_core.train import checkpoint

    mounted = False
    target = tmp_path / "small"
    target.mkdir()
    if shutil.which("mount") and os.geteuid() == 0:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(target)],
                                 capture_output=True).returncode == 0
    try:
        if not mounted:
            real_save = torch.save

            def full_disk_save(obj, fh, *a, **k):
                fh.write(b"x" * 100)
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

            monkeypatch.setattr(torch, "save", full_disk_save)
            usage = _shutil.disk_usage(tmp_path)
            monkeypatch.setattr(_shutil, "disk_usage", lambda p: usage._replace(free=1024))
            assert real_save is not None
        out = target / "run"
        code, stdout, stderr = run(["pretrain", "--data", "phantom:1", "--phantom-shape", "48", "--img-size", "48",
                                    "--model", "tiny", "--steps", "1", "--batch-size", "1", "--num-workers", "0",
                                    "--out-dir", str(out), "--progress-json"], capsys)
        line = assert_clean_failure("pretrain", code, stdout, stderr, ("step_00000001.pt", "disk full"))
        assert "unexpected pos" not in line.split("(")[0]
        events = [json.loads(ln) for ln in stdout.splitlines()]
        assert events[0]["event"] == "start"  # the stream no longer just stops after start
        assert temp_leftovers(target) == []
        assert not [p for p in out.iterdir() if p.name.startswith((".step", "step_"))] if out.exists() else True
    finally:
        if mounted:
            subprocess.run(["umount", str(target)], capture_output=True)
    assert checkpoint is not None


def test_pretrain_on_a_single_nan_file(bad, tmp_path, capsys):
    path, name = bad["NaN"]
    out = tmp_path / "run"
    code, stdout, stderr = run(["pretrain", "--data", str(path), "--out-dir", str(out), "--steps", "2",
                                "--batch-size", "1", "--img-size", "48", "--model", "tiny", "--num-workers", "0",
                                "--spacing-mm", "6", "--progress-json"], capsys)
    line = assert_clean_failure("pretrain", code, stdout, stderr, (name, "non-finite"))
    assert "none of the 1 input volumes could be loaded" in line
    assert_nothing_left(tmp_path, out)  # not even config.yaml


# ----------------------------------------------------------------------------- stale temporary files
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_checkpoint_temp_files_are_removed_on_start(tmp_path, capsys):
    from medgmae_core.train.checkpoint import clean_stale_temp_files

    out = tmp_path / "run"
    out.mkdir()
    dead = _dead_pid()
    stale = [out / f".step_00000004.pt.{dead}.tmp", out / f".last.pt.{dead}.link"]
    live = out / f".step_00000005.pt.{os.getpid()}.tmp"  # a running process's write is never touched
    for p in stale + [live]:
        p.write_bytes(b"half a checkpoint")
    keep = out / "notes.txt"
    keep.write_text("mine")
    assert sorted(clean_stale_temp_files(out)) == sorted(stale)
    assert live.exists() and keep.exists()
    live.unlink()
    # a command starting in that folder does the same (here pretrain, which then fails on its data)
    stale[0].write_bytes(b"x")
    code, stdout, stderr = run(["pretrain", "--data", str(tmp_path / "missing"), "--out-dir", str(out),
                                "--progress-json"], capsys)
    assert code == 2 and not stale[0].exists() and keep.exists()


# ----------------------------------------------------------------------------- one shape rule
def test_trailing_singleton_axis_is_3d_everywhere(tmp_path):
    """``[X, Y, Z, 1]`` is a 3D volume for every reader (demo, segment, reconstruct, pretrain's header check)."""
    from medgmae_core.data.datasets import header_problem
    from medgmae_core.data.readers import read_ct
    from medgmae_core.recon.simulation import load_ct_volume

    hu = phantom_hu()
    path = write_nifti(tmp_path / "x1.nii.gz", hu[..., None])
    array, affine = read_ct(path)
    assert array.shape == CT_SHAPE
    assert load_ct_volume(path)[0].shape == CT_SHAPE
    assert header_problem(path) is None
    four = write_nifti(tmp_path / "x2.nii.gz", np.stack([hu, hu], -1))
    with pytest.raises(ValueError, match="4D image"):
        read_ct(four)
    with pytest.raises(ValueError, match="4D image"):
        load_ct_volume(four)
    assert "4D image" in header_problem(four)


# ----------------------------------------------------------------------------- demo outputs on the input grid
def _lps_oblique_affine(shape) -> np.ndarray:
    """An LPS-stored (i -> left, j -> posterior) oblique grid: 15 degrees about the z axis, 1.2 x 1.4 x 3 mm."""
    c, s = np.cos(np.deg2rad(15)), np.sin(np.deg2rad(15))
    rot = np.array([[-c, s, 0], [-s, -c, 0], [0, 0, 1.0]])
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag([1.2, 1.4, 3.0])
    a[:3, 3] = [40.0, 25.0, -30.0]
    return a


@pytest.mark.parametrize("case", ["lps_oblique", "anisotropic"])
def test_demo_nifti_outputs_are_on_the_input_grid(case, weights, tmp_path):
    from medgmae_core.commands import demo

    if case == "lps_oblique":
        shape = (34, 30, 14)
        affine = _lps_oblique_affine(shape)
        hu = make_phantom(shape=shape, spacing_mm=(1.2, 1.4, 3.0), seed=1).hu[::-1, ::-1, :].copy()
    else:
        shape = (40, 36, 9)
        affine = np.diag([0.8, 0.8, 5.0, 1.0])
        affine[:3, 3] = [-16.0, -14.0, 20.0]
        hu = make_phantom(shape=shape, spacing_mm=(0.8, 0.8, 5.0), seed=2).hu
    ct = write_nifti(tmp_path / f"{case}.nii.gz", hu.astype(np.float32), affine)
    ref = nib.load(str(ct))
    res = demo.run_demo(ct, tmp_path / "out", weights=weights, spacing_mm=3.0, seed=0, model_grid=True)
    for key in ("prediction", "mask"):
        img = nib.load(res.outputs[key])
        assert img.shape == ref.shape, (key, img.shape, ref.shape)
        np.testing.assert_allclose(img.affine, ref.affine, atol=1e-5)
        assert int(img.header["sform_code"]) == 1
    mask = nib.load(res.outputs["mask"]).get_fdata()
    assert set(np.unique(mask)) <= {0.0, 1.0}
    pred = nib.load(res.outputs["prediction"]).get_fdata()
    assert np.isfinite(pred).all() and -175.0 - 1e-3 <= pred.min() and pred.max() <= 250.0 + 1e-3
    # the model-grid files are the same prediction before resampling: RAS, 3 mm, covering the same box
    grid = nib.load(res.outputs["prediction_model_grid"])
    assert grid.shape == tuple(res.prepared_shape)
    np.testing.assert_allclose(np.abs(np.diag(grid.affine)[:3]), 3.0, rtol=0.35)
    assert np.all(np.diag(grid.affine)[:3] > 0)  # RAS
    # the resampled prediction at the input voxels agrees with the model grid at the same world points
    from medgmae_core.data.volumes import resample_linear, resample_nearest

    back = resample_linear(grid.get_fdata(), grid.affine, ref.shape, ref.affine)
    np.testing.assert_allclose(pred, back, atol=1e-3)
    assert pred.std() > 0  # not a constant fill
    mask_grid = nib.load(res.outputs["mask_model_grid"])
    np.testing.assert_array_equal(mask, resample_nearest(np.asarray(mask_grid.dataobj), mask_grid.affine, ref.shape,
                                                         ref.affine, mode="nearest"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        Path(p).name for p in res.outputs.values())


# ----------------------------------------------------------------------------- units in metrics.json
def test_metrics_json_says_when_units_are_unknown(tmp_path, capsys):
    """A data-exchange scan does not record its pixel pitch: metrics.json must not claim 1/mm."""
    import h5py

    rng = np.random.default_rng(0)
    views, rows, cols = 12, 2, 24
    theta = np.linspace(0.0, 180.0, views, endpoint=False)
    u = np.arange(cols) - (cols - 1) / 2
    counts = 1000.0 * np.exp(-0.05 * np.clip(36 - u[None, None, :] ** 2, 0, None)) * np.ones((views, rows, 1))
    path = tmp_path / "scan.h5"
    with h5py.File(path, "w") as f:
        f["exchange/data"] = counts + rng.normal(0, 1, counts.shape)
        f["exchange/data_white"] = np.full((2, rows, cols), 1000.0)
        f["exchange/data_dark"] = np.zeros((2, rows, cols))
        f["exchange/theta"] = theta
    out = tmp_path / "rec"
    code, _, err = run(["reconstruct", str(path), "--out", str(out), "--init", "fbp", "--num-gaussians", "30",
                        "--iters", "1", "--eval-every", "1", "--centre", str((cols - 1) / 2)], capsys)
    assert code == 0, err
    units = json.loads((out / "metrics.json").read_text())["units"]
    assert units.startswith("unknown") and "--pixel-size" in units
    assert not (out / "reconstruction_hu.nii.gz").exists()


@pytest.mark.parametrize("command", ["segment", "render"])
def test_disk_full_while_writing_names_the_output_not_a_temp_file(command, seg_checkpoint, good_ply, small_ct,
                                                                  tmp_path, capsys, monkeypatch):
    """ENOSPC inside nibabel's writer: the line names the final output and says the disk is full; neither the
    NIfTI nor its sidecar (segment's labels JSON, render's PNG) is left, nor any temporary file."""
    def full_disk(img, filename, *a, **k):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))

    monkeypatch.setattr(nib, "save", full_disk)
    out = tmp_path / "out" / "result.nii.gz"
    if command == "segment":
        argv = ["segment", str(small_ct), "--checkpoint", str(seg_checkpoint), "--out", str(out), "--device", "cpu"]
    else:
        argv = ["render", str(good_ply), "--out", str(out), "--png", str(tmp_path / "out" / "r.png")]
    code, stdout, stderr = run(argv + ["--progress-json"], capsys)
    line = assert_clean_failure(command, code, stdout, stderr, (str(out), "disk full"))
    assert ".tmp" not in line
    assert_nothing_left(tmp_path, tmp_path / "out")


# ----------------------------------------------------------------------------- a new command gets it for free
FAKE_COMMAND = '''
import errno, os
from pathlib import Path
from medgmae_core import errors

def add_arguments(parser):
    parser.add_argument("--out", required=True)
    parser.add_argument("--fault", choices=("disk-full", "bad-value", "bug"), required=True)

def main(args):
    out = errors.make_output_dir(args.out)
    staged = errors.StagedOutputs(staging_dir=out)
    staged.path(out / "a.txt").write_text("written")
    with errors.atomic_path(out / "b.bin") as tmp:
        tmp.write_bytes(b"half")
        if args.fault == "disk-full":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
        if args.fault == "bad-value":
            raise ValueError("--fault: bad-value chosen")
        1 / 0
'''


@pytest.mark.parametrize("fault,expected", [("disk-full", ("b.bin", "disk full")), ("bad-value", ("--fault",))])
def test_a_new_command_gets_the_error_path_for_free(fault, expected, tmp_path, capsys, monkeypatch):
    (tmp_path / "fake_medgmae_command.py").write_text(FAKE_COMMAND)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "fake", ("fake_medgmae_command", "a command written after issue 13"))
    out = tmp_path / "new" / "out"
    code, stdout, stderr = run(["fake", "--out", str(out), "--fault", fault, "--progress-json"], capsys)
    line = assert_clean_failure("fake", code, stdout, stderr, expected)
    assert ".tmp" not in line
    assert not (tmp_path / "new").exists()  # the folders it created, now empty, are gone too
    assert temp_leftovers(tmp_path) == []


def test_a_bug_keeps_its_traceback_but_still_emits_error_and_cleans_up(tmp_path, capsys, monkeypatch):
    (tmp_path / "fake_medgmae_command.py").write_text(FAKE_COMMAND)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "fake", ("fake_medgmae_command", "a command with a bug"))
    with pytest.raises(ZeroDivisionError):
        cli.main(["fake", "--out", str(tmp_path / "out"), "--fault", "bug", "--progress-json"])
    events = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert events[-1]["event"] == "error" and events[-1]["message"].startswith("internal error: ZeroDivisionError")
    assert not (tmp_path / "out").exists() and temp_leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- synthetic DICOM series checks
def _write_dicom_series(folder: Path, positions, orientations=None, size: int = 12) -> Path:
    """A tiny CT series written with SimpleITK: one 16-bit slice per position (mm along z)."""
    import SimpleITK as sitk

    folder.mkdir(parents=True)
    uid = "1.2.826.0.1.3680043.2.1125.13"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for i, z in enumerate(positions):
        img = sitk.GetImageFromArray(np.random.default_rng(i).integers(-1000, 1000, (1, size, size)).astype(np.int16))
        ori = orientations[i] if orientations else (1, 0, 0, 0, 1, 0)
        for key, value in {"0008|0060": "CT", "0020|000e": uid, "0020|000d": uid + ".0", "0020|0013": str(i + 1),
                           "0020|0032": f"0\\0\\{z}", "0020|0037": "\\".join(str(v) for v in ori),
                           "0028|0030": "1\\1", "0008|0018": f"{uid}.{i + 1}",
                           "0008|0016": "1.2.840.10008.5.1.4.1.1.2"}.items():
            img.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"slice{i:03d}.dcm"))
        writer.Execute(img)
    return folder


tilted = (1, 0, 0, 0, 0.8, 0.6)
DICOM_SERIES = [  # (name, positions, orientations, expected message parts or None for a good series)
    ("uniform", [0, 2, 4, 6, 8], None, None),
    ("gap", [0, 2, 4, 8, 10], None, ("not uniform", "4 mm between slice002.dcm and slice003.dcm",
                                     "about 1 slice(s) missing", "--resample-dicom")),
    ("uneven", [0, 2, 4, 5.5, 8], None, ("not uniform", "slice002.dcm and slice003.dcm")),
    ("duplicate", [0, 2, 4, 4, 6], None, ("same position", "slice002.dcm and slice003.dcm")),
    ("mixed orientation", [0, 2, 4, 6, 8], [None, None, tilted, None, None],
     ("orientation differs", "slice002.dcm")),
]


@pytest.mark.parametrize("name,positions,orientations,expected", DICOM_SERIES, ids=[d[0] for d in DICOM_SERIES])
def test_dicom_series_positions_are_checked(name, positions, orientations, expected, tmp_path):
    from medgmae_core.data.readers import read_dicom_series, read_image
    from medgmae_core.errors import InputError

    if orientations:
        orientations = [o or (1, 0, 0, 0, 1, 0) for o in orientations]
    folder = _write_dicom_series(tmp_path / "series", positions, orientations)
    if expected is None:
        array, affine = read_image(folder)
        assert array.shape == (12, 12, 5)
        np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), [1, 1, 2], atol=1e-6)
        return
    with pytest.raises(InputError) as info:
        read_image(folder)
    for part in expected:
        assert part in str(info.value), (part, str(info.value))
    if name == "gap":  # resampled: 6 uniform slices, the known ones unchanged, the missing one interpolated
        import SimpleITK as sitk

        image = read_dicom_series(folder, resample=True)
        array = sitk.GetArrayFromImage(image)
        assert array.shape == (6, 12, 12) and image.GetSpacing()[2] == pytest.approx(2.0)
        slices = [sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"slice{i:03d}.dcm")))[0].astype(np.float32)
                  for i in range(5)]  # at z = 0, 2, 4, 8, 10
        for k, i in ((0, 0), (1, 1), (2, 2), (4, 3), (5, 4)):
            np.testing.assert_array_equal(array[k], slices[i])
        np.testing.assert_allclose(array[3], 0.5 * (slices[2] + slices[3]), atol=1e-3)  # z = 6, interpolated
    if name in ("duplicate", "mixed orientation"):  # resampling cannot fix these: still refused
        with pytest.raises(InputError):
            read_dicom_series(folder, resample=True)
