"""Data pipeline: real CT (NIfTI, DICOM, NRRD), crops, HU window, discovery, skip-and-count, determinism."""
from __future__ import annotations

import gzip
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medgmae_core.data.datasets import (PretrainCrops, SkipReport, crop_batches, discover_volumes, load_datalist,
                                        phantom_cases, validate_volumes)
from medgmae_core.data.transforms import (HU_WINDOW, NotCTError, inference_transforms, pretrain_transforms,
                                          window_hu)

nib = pytest.importorskip("nibabel")


@pytest.fixture(scope="module")
def example_ct_dicom(shared_ct: Path) -> Path:
    """20-slice JPEG2000 DICOM CT series (TotalSegmentator example_ct_dicom)."""
    return shared_ct / "totalsegmentator" / "example_ct_dicom"


def _write_nifti(path: Path, array: np.ndarray, spacing: float = 3.0) -> Path:
    nib.save(nib.Nifti1Image(array, np.diag([spacing, spacing, spacing, 1.0])), str(path))
    return path


def test_window_hu():
    x = np.array([-1000, -175, 37.5, 250, 3000], np.float32)
    np.testing.assert_allclose(window_hu(x.astype(np.int16))[[0, 3]], [0, 1])
    np.testing.assert_allclose(window_hu(x), [0, 0, 0.5, 1, 1])
    t = window_hu(torch.tensor(x))
    assert t.dtype == torch.float32
    np.testing.assert_allclose(t.numpy(), [0, 0, 0.5, 1, 1])
    assert HU_WINDOW == (-175.0, 250.0)
    with pytest.raises(ValueError, match="window"):
        window_hu(x, (10, 0))


def test_pretrain_pipeline_on_real_ct(small_real_ct):
    crops = pretrain_transforms(spacing_mm=1.5, roi_size=96, num_samples=3)({"image": str(small_real_ct)})
    assert len(crops) == 3
    for crop in crops:
        img = crop["image"]
        assert tuple(img.shape) == (1, 96, 96, 96)
        assert img.dtype == torch.float32
        assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
    assert max(float((c["image"] > 0).float().mean()) for c in crops) > 0.3  # foreground-weighted crops


def test_inference_pipeline_resamples_to_ras(small_real_ct):
    out = inference_transforms(spacing_mm=1.5)({"image": str(small_real_ct)})["image"]
    # 122 x 101 x 30 voxels of 3 mm -> about twice as many at 1.5 mm, RAS
    assert out.shape[0] == 1 and all(abs(n - 2 * m) <= 2 for n, m in zip(out.shape[1:], (122, 101, 30)))
    np.testing.assert_allclose(np.diag(out.affine.numpy())[:3], [1.5, 1.5, 1.5], atol=1e-6)
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    raw = np.asarray(nib.load(str(small_real_ct)).dataobj, np.float32)
    assert abs(float(out.mean()) - float(window_hu(raw).mean())) < 0.02  # same content, other grid


def test_dicom_series_folder_loads(example_ct_dicom):
    out = inference_transforms(spacing_mm=None)({"image": str(example_ct_dicom)})["image"]
    assert tuple(out.shape) == (1, 512, 512, 20)
    spacing = np.linalg.norm(out.affine.numpy()[:3, :3], axis=0)
    np.testing.assert_allclose(spacing, [0.977, 0.977, 2.0], atol=0.01)
    assert 0.05 < float(out.mean()) < 0.6  # HU were decoded (JPEG2000) and windowed
    crops = pretrain_transforms(spacing_mm=3.0, roi_size=48, num_samples=2)({"image": str(example_ct_dicom)})
    assert [tuple(c["image"].shape) for c in crops] == [(1, 48, 48, 48)] * 2


def test_nrrd_matches_nifti(small_real_ct, tmp_path):
    """The SimpleITK reader (LPS) and nibabel (RAS) must give the same RAS array and affine."""
    sitk = pytest.importorskip("SimpleITK")
    nrrd = tmp_path / "ct.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(small_real_ct)), str(nrrd))
    a = inference_transforms(spacing_mm=None)({"image": str(small_real_ct)})["image"]
    b = inference_transforms(spacing_mm=None)({"image": str(nrrd)})["image"]
    assert a.shape == b.shape
    np.testing.assert_allclose(a.affine.numpy(), b.affine.numpy(), atol=1e-3)
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)


@pytest.fixture()
def messy_folder(tmp_path, small_real_ct) -> Path:
    """One good CT among a corrupt file, a truncated one, a 2D image and an MR-like volume."""
    folder = tmp_path / "cases"
    (folder / "sub").mkdir(parents=True)
    (folder / "good.nii.gz").symlink_to(small_real_ct)
    (folder / "corrupt.nii.gz").write_bytes(b"this is not a NIfTI file" * 40)
    data = small_real_ct.read_bytes()
    (folder / "truncated.nii.gz").write_bytes(gzip.compress(gzip.decompress(data)[:40_000]))
    _write_nifti(folder / "flat.nii.gz", np.zeros((64, 64), np.int16))
    rng = np.random.default_rng(0)
    _write_nifti(folder / "sub" / "mr_like.nii.gz", rng.uniform(0, 1200, (40, 40, 20)).astype(np.float32))
    (folder / "notes.txt").write_text("ignored")
    return folder


def test_bad_inputs_are_skipped_and_counted(messy_folder):
    cases = discover_volumes(messy_folder)
    names = sorted(Path(c["name"]).name for c in cases)
    assert names == ["corrupt.nii.gz", "flat.nii.gz", "good.nii.gz", "mr_like.nii.gz", "truncated.nii.gz"]

    report = SkipReport(verbose=False)
    usable = validate_volumes(cases, report)  # header-only checks
    assert {Path(n).name for n in report.reasons} == {"corrupt.nii.gz", "flat.nii.gz"}
    assert "2D image" in report.reasons[str(messy_folder / "flat.nii.gz")]
    assert "unreadable" in report.reasons[str(messy_folder / "corrupt.nii.gz")]

    dataset = PretrainCrops(usable, roi_size=32, spacing_mm=3.0, crops_per_case=2, seed=0)
    seen = []
    for batch, skipped in itertools.islice(crop_batches(dataset, batch_size=2), 4):  # 2 epochs of 3 cases
        assert tuple(batch.shape) == (2, 1, 32, 32, 32)
        for name, reason in skipped:
            report.add(name, reason)
        seen.append(batch)
    assert len(report) == 4, report.summary()
    assert "do not look like CT" in report.reasons[str(messy_folder / "sub" / "mr_like.nii.gz")]
    assert "cannot read" in report.reasons[str(messy_folder / "truncated.nii.gz")]
    assert "skipped 4 input(s)" in report.summary()


def test_all_bad_inputs_give_a_clear_error(tmp_path):
    _write_nifti(tmp_path / "mr.nii.gz", np.full((20, 20, 20), 300.0, np.float32))
    dataset = PretrainCrops(discover_volumes(tmp_path), roi_size=16, spacing_mm=3.0, crops_per_case=1)
    with pytest.raises(RuntimeError, match="none of the 1 input volumes could be loaded.*mr.nii.gz"):
        next(crop_batches(dataset, 1))


def test_not_ct_error_names_the_file(tmp_path):
    path = _write_nifti(tmp_path / "scaled.nii.gz", np.random.default_rng(0).random((20, 20, 20), np.float32))
    with pytest.raises(NotCTError, match="scaled.nii.gz.*Hounsfield"):
        inference_transforms()({"image": str(path)})


def test_missing_and_unknown_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="data path not found: .*nowhere"):
        discover_volumes(tmp_path / "nowhere")
    (tmp_path / "a.png").write_bytes(b"x")
    with pytest.raises(ValueError, match="a.png: not a NIfTI"):
        discover_volumes(tmp_path / "a.png")


def test_datalist_json(tmp_path, small_real_ct):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "ct.nii.gz").symlink_to(small_real_ct)
    (tmp_path / "list.json").write_text(json.dumps({"training": [{"image": "imgs/ct.nii.gz"}, {"image": "/abs.nii"}]}))
    cases = load_datalist(tmp_path / "list.json")
    assert [c["image"] for c in cases] == [str(tmp_path / "imgs" / "ct.nii.gz"), "/abs.nii"]
    assert discover_volumes(tmp_path / "list.json") == cases
    with pytest.raises(ValueError, match="no list under key 'validation'"):
        load_datalist(tmp_path / "list.json", key="validation")


def test_dicom_folder_is_discovered(example_ct_dicom):
    cases = discover_volumes(example_ct_dicom.parent)
    assert str(example_ct_dicom) in [c["image"] for c in cases]
    report = SkipReport(verbose=False)
    assert validate_volumes([c for c in cases if c["image"] == str(example_ct_dicom)], report) and not len(report)


def test_crop_stream_is_a_function_of_seed_and_step():
    cases = phantom_cases(3, shape=(40, 40, 32))
    dataset = PretrainCrops(cases, roi_size=24, spacing_mm=1.5, crops_per_case=3, seed=7)
    full = [b for b, _ in itertools.islice(crop_batches(dataset, 2), 5)]
    resumed = [b for b, _ in itertools.islice(crop_batches(dataset, 2, start_step=3), 2)]
    for a, b in zip(full[3:], resumed):
        assert torch.equal(a, b)
    with_workers = [b for b, _ in itertools.islice(crop_batches(dataset, 2, start_step=2, num_workers=2), 2)]
    for a, b in zip(full[2:], with_workers):  # worker processes change nothing
        assert torch.equal(a, b)
    assert not torch.equal(full[0], full[1])
    # two ranks read disjoint case slots, so their first batches differ
    rank0 = next(crop_batches(dataset, 2, rank=0, world_size=2))[0]
    rank1 = next(crop_batches(dataset, 2, rank=1, world_size=2))[0]
    assert not torch.equal(rank0, rank1)
    other_seed = PretrainCrops(cases, roi_size=24, spacing_mm=1.5, crops_per_case=3, seed=8)
    assert not torch.equal(next(crop_batches(other_seed, 2))[0], full[0])
    # every case appears once per epoch
    assert sorted(dataset.case_order(0).tolist()) == [0, 1, 2]


def test_disk_cache_is_reused_and_keyed_by_settings(small_real_ct, tmp_path):
    cases = discover_volumes(small_real_ct)
    first = PretrainCrops(cases, roi_size=32, spacing_mm=3.0, crops_per_case=2, cache="disk", cache_dir=tmp_path)
    batch = next(crop_batches(first, 2))[0]
    files = sorted(tmp_path.rglob("*.pt"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    again = PretrainCrops(cases, roi_size=32, spacing_mm=3.0, crops_per_case=2, cache="disk", cache_dir=tmp_path)
    assert torch.equal(next(crop_batches(again, 2))[0], batch)
    assert files[0].stat().st_mtime_ns == stamp  # read back, not recomputed
    other = PretrainCrops(cases, roi_size=32, spacing_mm=4.0, crops_per_case=2, cache="disk", cache_dir=tmp_path)
    next(crop_batches(other, 2))
    assert len(list(tmp_path.glob("preprocess-*"))) == 2  # another spacing, another cache
    with pytest.raises(ValueError, match="cache must be"):
        PretrainCrops(cases, cache="ram")
