"""Label maps, class subsets, grids and the evaluate command, on the real TotalSegmentator label maps."""
from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest

from medgmae_core.seg.evaluate import dice_score, evaluate_arrays, evaluate_files, format_table, hd95
from medgmae_core.data.volumes import read_volume, reorient_to, write_nifti
from medgmae_core.seg.labels import LabelMap, check_label_ids, remap_labels, sidecar_path


@pytest.fixture(scope="module")
def ts(shared_ct):
    return shared_ct / "totalsegmentator"


@pytest.fixture(scope="module")
def total_map(ts):
    return LabelMap.from_json(ts / "labels_total_v2.json")


def test_total_map_names_and_subset(total_map, ts):
    assert total_map.names[5] == "liver" and total_map.names[1] == "spleen"
    task = total_map.select("liver,spleen,kidneys=kidney_left+kidney_right")
    assert task.names == {1: "liver", 2: "spleen", 3: "kidneys"}
    assert task.sources == {1: (5,), 2: (1,), 3: (3, 2)}
    seg = np.asarray(nib.load(ts / "example_seg.nii.gz").dataobj)
    out = remap_labels(seg, task, total_map)
    assert set(np.unique(out).tolist()) == {0, 1, 2, 3}
    assert np.array_equal(out == 1, seg == 5)
    assert np.array_equal(out == 3, (seg == 2) | (seg == 3))
    assert (out == 0).sum() == np.isin(seg, [0] + [i for i in np.unique(seg) if i not in (1, 2, 3, 5)]).sum()


def test_label_errors(total_map):
    with pytest.raises(ValueError, match="'livr' is not in the label map.*liver"):
        total_map.select("livr,spleen")
    with pytest.raises(ValueError, match="used twice"):
        total_map.select("liver,organ=liver+spleen")
    small = LabelMap({1: "liver", 2: "spleen"})
    with pytest.raises(ValueError, match=r"contains label ids \[7\] that are not in the label map"):
        check_label_ids(np.array([[0, 1], [2, 7]]), small, origin="case.nii.gz")
    with pytest.raises(ValueError, match="used by ids"):
        LabelMap({1: "liver", 2: "liver"})


def test_label_map_json_roundtrip(tmp_path, total_map):
    task = total_map.select("liver,kidneys=kidney_left+kidney_right")
    path = task.save_json(tmp_path / "x.labels.json")
    back = LabelMap.from_json(path)
    assert back == task
    assert LabelMap.from_dict({"liver": 3, "spleen": 1}).names == {3: "liver", 1: "spleen"}
    assert sidecar_path("/a/seg.nii.gz").name == "seg.labels.json"


def _hd95_brute(a: np.ndarray, b: np.ndarray, spacing) -> float:
    """All-pairs surface distances (small masks only), the slow obvious reference:
    the larger of the two directed 95th percentiles (MONAI's and nnU-Net's definition)."""
    from scipy import ndimage

    def surface(m):
        return np.argwhere(m & ~ndimage.binary_erosion(m)) * np.asarray(spacing)

    sa, sb = surface(a), surface(b)
    d = np.sqrt(((sa[:, None, :] - sb[None, :, :]) ** 2).sum(-1))
    return max(float(np.percentile(d.min(1), 95)), float(np.percentile(d.min(0), 95)))


def test_dice_and_hd95_against_brute_force():
    rng = np.random.default_rng(0)
    a = np.zeros((20, 22, 18), bool)
    b = np.zeros_like(a)
    a[4:14, 5:15, 3:12] = True
    b[6:16, 5:17, 4:12] = True
    b &= rng.random(b.shape) > 0.05
    inter = (a & b).sum()
    assert dice_score(a, b) == pytest.approx(2 * inter / (a.sum() + b.sum()))
    spacing = (1.5, 0.8, 3.0)
    assert hd95(a, b, spacing) == pytest.approx(_hd95_brute(a, b, spacing), rel=0.02)
    assert math.isnan(dice_score(np.zeros(3, bool), np.zeros(3, bool)))
    assert math.isinf(hd95(a, np.zeros_like(a), spacing))


def test_evaluate_shifted_prediction(ts, total_map, tmp_path):
    img = nib.load(ts / "example_seg.nii.gz")
    seg = np.asarray(img.dataobj)
    shifted = np.roll(seg, 2, axis=0)  # 2 voxels = 6 mm
    pred_path = write_nifti(shifted, img.affine, tmp_path / "pred.nii.gz")
    res = evaluate_files(pred_path, ts / "example_seg.nii.gz", labels=ts / "labels_total_v2.json",
                         classes="liver,spleen,kidney_left,kidney_right")
    assert list(res["classes"]) == ["liver", "spleen", "kidney_left", "kidney_right"]
    for name in res["classes"]:
        c = res["classes"][name]
        idx = total_map.id_of(name)
        expect = dice_score(shifted == idx, seg == idx)
        assert c["dice"] == pytest.approx(expect)
        assert 0.3 < c["dice"] < 1.0
        assert c["hd95_mm"] == pytest.approx(6.0, abs=3.1)  # a 6 mm shift
    assert res["mean_dice"] == pytest.approx(np.mean([c["dice"] for c in res["classes"].values()]))
    table = format_table(res)
    assert "liver" in table and "mean" in table


def test_evaluate_cli_with_sidecar(ts, tmp_path, capsys):
    """A 2-class prediction in its own ids is matched to the TotalSegmentator reference by name."""
    from medgmae_core.cli import main

    img = nib.load(ts / "example_seg.nii.gz")
    seg = np.asarray(img.dataobj)
    pred = np.zeros_like(seg)
    pred[seg == 1] = 1  # spleen -> id 1
    pred[seg == 5] = 2  # liver -> id 2
    write_nifti(pred, img.affine, tmp_path / "p.nii.gz")
    LabelMap({1: "spleen", 2: "liver"}).save_json(sidecar_path(tmp_path / "p.nii.gz"))
    out = tmp_path / "m.json"
    rc = main(["evaluate", "--pred", str(tmp_path / "p.nii.gz"), "--ref", str(ts / "example_seg.nii.gz"),
               "--labels", str(ts / "labels_total_v2.json"), "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["classes"]["spleen"]["dice"] == 1.0 and res["classes"]["liver"]["dice"] == 1.0
    assert res["classes"]["liver"]["hd95_mm"] == 0.0
    assert "spleen" in capsys.readouterr().out


def test_evaluate_merged_class_uses_its_sources(ts, total_map, tmp_path):
    """A 'kidneys' class trained from kidney_left+kidney_right is scored against both reference labels."""
    img = nib.load(ts / "example_seg.nii.gz")
    seg = np.asarray(img.dataobj)
    task = total_map.select("kidneys=kidney_left+kidney_right")
    write_nifti(remap_labels(seg, task, total_map), img.affine, tmp_path / "k.nii.gz")
    task.save_json(sidecar_path(tmp_path / "k.nii.gz"))
    res = evaluate_files(tmp_path / "k.nii.gz", ts / "example_seg.nii.gz", labels=ts / "labels_total_v2.json",
                         with_hd95=False)
    assert res["classes"]["kidneys"]["dice"] == 1.0
    assert res["classes"]["kidneys"]["ref_voxels"] == int(np.isin(seg, [2, 3]).sum())


def test_evaluate_errors(ts, tmp_path):
    from medgmae_core.cli import main

    # a prediction on another grid (example_ct is 112 slices, example_seg 30)
    rc = main(["evaluate", "--pred", str(ts / "example_seg_fast_force_split.nii.gz"),
               "--ref", str(ts / "example_seg.nii.gz"), "--no-hd95"])
    assert rc == 2
    with pytest.raises(ValueError, match="different voxel grids"):
        evaluate_files(ts / "example_seg_fast_force_split.nii.gz", ts / "example_seg.nii.gz")
    # label ids the label map does not name
    small = tmp_path / "small.json"
    small.write_text(json.dumps({"labels": {"1": "spleen", "5": "liver"}}))
    with pytest.raises(ValueError, match="not in the label map"):
        evaluate_files(ts / "example_seg.nii.gz", ts / "example_seg.nii.gz", labels=small)
    with pytest.raises(FileNotFoundError, match="prediction not found"):
        evaluate_files(tmp_path / "nope.nii.gz", ts / "example_seg.nii.gz")


def test_dicom_grid_reorientation(ts):
    """The DICOM series and its NIfTI label export hold the same voxels with a flipped axis."""
    ct = read_volume(ts / "example_ct_dicom")
    seg = read_volume(ts / "example_seg_dicom.nii.gz")
    assert ct.shape == seg.shape == (512, 512, 20)
    assert not np.allclose(ct.affine, seg.affine)
    lab = reorient_to(seg.array, seg.affine, ct.shape, ct.affine)
    hu = ct.array.astype(np.float32)
    # on the aligned grid the labels sit on the right tissue: liver ~ soft tissue, background mostly air
    assert 40 < hu[lab == 5].mean() < 140
    assert hu[lab == 0].mean() < -400
    # mis-aligned (unflipped) labels would not
    assert not 40 < hu[seg.array == 5].mean() < 140 or not np.array_equal(lab, seg.array)
    res = evaluate_arrays(lab, lab, ct.spacing, {5: "liver"}, with_hd95=False)
    assert res["mean_dice"] == 1.0
