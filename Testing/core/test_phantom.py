"""The procedural abdominal phantom: HU ranges, anatomy in RAS, seeds, speed, NIfTI output."""
from __future__ import annotations

import time

import numpy as np
import pytest

from medgmae_core.data.phantom import LABEL_IDS, LABEL_NAMES, make_phantom, write_phantom_nifti


@pytest.fixture(scope="module")
def phantom():
    return make_phantom((128, 128, 96), spacing_mm=1.5, seed=0)


def _median(ph, name):
    return float(np.median(ph.hu[ph.labels == LABEL_IDS[name]]))


def _centroid(ph, name):
    return np.argwhere(ph.labels == LABEL_IDS[name]).mean(0)


def test_arrays_affine_and_labels(phantom):
    assert phantom.hu.shape == (128, 128, 96) and phantom.hu.dtype == np.float32
    assert phantom.labels.shape == (128, 128, 96) and phantom.labels.dtype == np.uint8
    np.testing.assert_allclose(np.diag(phantom.affine)[:3], [1.5, 1.5, 1.5])
    np.testing.assert_allclose(phantom.affine[:3, 3], -(np.array([128, 128, 96]) - 1) / 2 * 1.5)
    assert phantom.spacing_mm == (1.5, 1.5, 1.5)
    present = set(np.unique(phantom.labels).tolist())
    assert present == set(LABEL_NAMES), f"missing labels: {set(LABEL_NAMES) - present}"
    assert phantom.label_names == LABEL_NAMES


def test_hounsfield_ranges(phantom):
    hu = phantom.hu
    assert -1024 <= hu.min() and hu.max() <= 3071
    assert abs(_median(phantom, "background") + 1000) < 40
    assert -880 < _median(phantom, "lung_right") < -780
    assert -130 < _median(phantom, "body") < -60  # mostly fat
    assert 30 < _median(phantom, "muscle") < 70
    assert 70 < _median(phantom, "liver") < 130
    assert 80 < _median(phantom, "spleen") < 140
    assert 220 < _median(phantom, "aorta") < 330  # contrast
    assert _median(phantom, "aorta") > _median(phantom, "inferior_vena_cava") > _median(phantom, "liver") - 10
    kidney = hu[phantom.labels == LABEL_IDS["kidney_left"]]
    assert np.percentile(kidney, 90) > np.percentile(kidney, 10) + 40  # bright cortex over darker medulla
    assert np.percentile(kidney, 90) > _median(phantom, "liver") + 50
    bone = hu[phantom.labels == LABEL_IDS["vertebrae"]]
    assert np.percentile(bone, 95) > 700 and 120 < np.median(bone) < 400  # cortical shell, cancellous core
    assert (hu[phantom.labels == LABEL_IDS["stomach"]] < -900).sum() > 50  # gastric air
    assert (hu[phantom.labels == LABEL_IDS["bowel"]] < -900).sum() > 0  # bowel gas
    liver = hu[phantom.labels == LABEL_IDS["liver"]]
    assert 3 < liver.std() < 25  # mild noise and texture, not flat, not noisy


def test_anatomy_in_ras(phantom):
    """RAS arrays: axis 0 increases to the patient's right, 1 anteriorly, 2 superiorly."""
    assert _centroid(phantom, "liver")[0] > 64 > _centroid(phantom, "spleen")[0]
    assert _centroid(phantom, "kidney_right")[0] > 64 > _centroid(phantom, "kidney_left")[0]
    assert _centroid(phantom, "inferior_vena_cava")[0] > _centroid(phantom, "aorta")[0]
    assert _centroid(phantom, "vertebrae")[1] < _centroid(phantom, "aorta")[1] < _centroid(phantom, "stomach")[1]
    assert _centroid(phantom, "lung_left")[2] > 0.7 * 95
    assert _centroid(phantom, "bowel")[2] < 0.5 * 95


def test_seed_variation_and_determinism():
    a = make_phantom((48, 48, 32), seed=3)
    b = make_phantom((48, 48, 32), seed=3)
    c = make_phantom((48, 48, 32), seed=4)
    np.testing.assert_array_equal(a.hu, b.hu)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert (a.labels != c.labels).mean() > 0.01
    assert not np.allclose(a.hu, c.hu)


def test_fast_enough():
    make_phantom((32, 32, 32), seed=0)  # warm imports
    t0 = time.perf_counter()
    make_phantom((128, 128, 96), seed=1)
    elapsed = time.perf_counter() - t0
    assert elapsed < 3.0, f"phantom took {elapsed:.2f} s (target < 1 s on an idle core)"


def test_write_nifti(tmp_path):
    nib = pytest.importorskip("nibabel")
    paths = write_phantom_nifti(tmp_path / "ph", shape=(40, 36, 24), spacing_mm=2.0, seed=5, name="case")
    ct, lab = nib.load(str(paths["image"])), nib.load(str(paths["label"]))
    ph = make_phantom((40, 36, 24), spacing_mm=2.0, seed=5)
    assert ct.get_data_dtype() == np.int16 and ct.shape == (40, 36, 24)
    np.testing.assert_allclose(ct.affine, ph.affine)
    assert nib.aff2axcodes(ct.affine) == ("R", "A", "S")
    np.testing.assert_array_equal(np.asarray(lab.dataobj), ph.labels)
    np.testing.assert_allclose(np.asarray(ct.dataobj), np.round(ph.hu), atol=0.5)


@pytest.mark.parametrize("shape, spacing", [((4, 64, 64), 1.5), ((64, 64), 1.5), ((32, 32, 32), 0.0)])
def test_bad_arguments(shape, spacing):
    with pytest.raises(ValueError, match="shape|spacing"):
        make_phantom(shape, spacing_mm=spacing)
