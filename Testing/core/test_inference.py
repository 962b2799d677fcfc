"""inference.py: window layout, sliding-window merge without double counting, CT preparation."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from medgmae_core import inference, spatial
from medgmae_core.gaussians import GaussianSet
from medgmae_core.render import render_volume

VOLUME = (40, 30, 23)
WINDOW = (16, 16, 16)
K_PER_WINDOW = 40  # fixed k per window, like a real model; padded with zero-intensity dummies


def coded_volume(shape) -> torch.Tensor:
    """Each voxel's value encodes its own (i, j, k), exactly in float64, never 0 inside the volume."""
    i, j, k = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return torch.from_numpy(((i + 1) + 64 * (j + 1) + 4096 * (k + 1)).astype(np.float64))


def decode_offset(window: torch.Tensor) -> tuple[int, int, int]:
    """Where a window starts in the coded volume, read from its first non-zero voxel."""
    pos = torch.nonzero(window)[0]
    code = int(window[tuple(pos)])
    ijk = np.array([code % 64, (code // 64) % 64, code // 4096]) - 1
    return tuple(int(v) for v in ijk - pos.numpy())


class KnownAnswerModel(torch.nn.Module):
    """Returns the known Gaussians whose centres lie inside each window, in that window's coords."""

    def __init__(self, truth: GaussianSet, volume_shape, window_shape):
        super().__init__()
        self.truth, self.volume_shape = truth, volume_shape
        self.config = SimpleNamespace(img_size=window_shape)
        self.calls = 0

    def predict_gaussians(self, x, mask_ratio=0.0, generator=None):
        self.calls += 1
        sets = []
        win = self.config.img_size
        for item in x[:, 0]:
            off = np.array(decode_offset(item))
            vox = self.truth.centres[0].numpy() * (np.array(self.volume_shape) - 1)
            # a window owns the Gaussians inside its voxel footprint [o - 1/2, o + n - 1/2)
            inside = torch.from_numpy(((vox >= off - 0.5) & (vox < off + np.array(win) - 0.5)).all(-1))
            local = spatial.volume_to_window(self.truth.select(inside), off, win, self.volume_shape)
            n_pad = K_PER_WINDOW - local.num_gaussians
            assert n_pad >= 0, "test set too dense for K_PER_WINDOW"
            dummy = GaussianSet.isotropic(torch.full((1, n_pad, 3), 0.5, dtype=torch.float64), 0.1,
                                          torch.zeros(1, n_pad, dtype=torch.float64))
            sets.append(GaussianSet.cat([local, dummy]))
        return GaussianSet.cat(sets, dim=0)

    def forward(self, x, mask_ratio=None, generator=None):
        gs = self.predict_gaussians(x)
        return SimpleNamespace(gaussians=gs, pred=x.clone(), mask=torch.zeros(x.shape[0], 8))

    def mask_volume(self, mask):
        return torch.ones(mask.shape[0], 1, *self.config.img_size)


def known_gaussians(k: int = 60, seed: int = 0) -> GaussianSet:
    g = torch.Generator().manual_seed(seed)
    return GaussianSet.random(1, k, sigma_range=(0.02, 0.06), generator=g, dtype=torch.float64)


def test_axis_offsets_cover_the_axis_and_cells_partition_it():
    for size, overlap, pad_last in [(40, 6, False), (40, 0, True), (96, 16, False), (10, 4, False), (274, 16, False)]:
        offs = inference.axis_offsets(size, 16 if size < 96 else 96, overlap, pad_last=pad_last)
        n = 16 if size < 96 else 96
        covered = np.zeros(size, bool)
        for o in offs:
            covered[max(0, o):min(size, o + n)] = True
        assert covered.all(), (size, offs)
        b = inference.axis_boundaries(offs, n)
        assert np.all(np.diff(b) > 0)
        for t, o in enumerate(offs):  # each cell, clipped to the volume, lies inside its own window
            lo, hi = max(b[t], -0.5), min(b[t + 1], size - 0.5)
            assert o - 0.5 <= lo < hi <= o + n - 0.5, (size, offs, t)
    assert inference.axis_offsets(10, 16, 4) == [-3]
    with pytest.raises(ValueError, match="overlap"):
        inference.axis_offsets(40, 16, 16)


@pytest.mark.parametrize("overlap,pad_last,batch", [(6, False, 3), (0, True, 2), (9, False, 1)])
def test_merged_windows_reproduce_the_whole_volume_render_without_double_counting(overlap, pad_last, batch):
    """Tolerance: 1e-6 of the peak (the window maps are exact up to an SVD re-factorisation in float64)."""
    truth = known_gaussians()
    model = KnownAnswerModel(truth, VOLUME, WINDOW)
    result = inference.predict_volume(model, coded_volume(VOLUME), overlap=overlap, pad_last=pad_last,
                                      batch_size=batch)
    grid = result.grid
    assert len(grid) > 1 and model.calls == -(-len(grid) // batch)
    merged = result.gaussians.select(result.gaussians.intensities[0] > 0)
    # every known Gaussian comes back exactly once
    assert merged.num_gaussians == truth.num_gaussians
    dist = torch.cdist(truth.centres[0], merged.centres[0])  # [k, k]
    nearest = dist.argmin(1)
    assert sorted(nearest.tolist()) == list(range(truth.num_gaussians))
    assert float(dist.min(1).values.max()) < 1e-6  # cdist itself loses ~1e-8
    np.testing.assert_allclose(merged.covariances()[0, nearest], truth.covariances()[0], atol=1e-12)
    expected = render_volume(truth, VOLUME, cutoff=None, backend="reference")
    got = render_volume(merged, VOLUME, cutoff=None, backend="reference")
    assert float((got - expected).abs().max()) <= 1e-6 * float(expected.abs().max())
    # without the partition cells, overlapping windows would count Gaussians twice (the test can fail)
    if overlap:
        naive = sum(int((model.predict_gaussians(inference.extract_window(
            coded_volume(VOLUME), grid.offset(t), WINDOW)[None, None]).intensities > 0).sum()) for t in range(len(grid)))
        assert naive > truth.num_gaussians


def test_stitched_render_takes_each_voxel_from_one_window():
    truth = known_gaussians(20, seed=1)
    model = KnownAnswerModel(truth, VOLUME, WINDOW)
    vol = coded_volume(VOLUME)
    result = inference.predict_volume(model, vol, overlap=5, stitch=True, batch_size=4)
    torch.testing.assert_close(result.pred, vol)  # the fake "renders" its own input: stitching is exact
    assert bool((result.mask == 1).all())  # every voxel was written by some window
    assert sum(result.kept_per_window) == result.gaussians.num_gaussians


def test_predict_window_centres_on_a_ras_point():
    truth = known_gaussians(20, seed=2)
    model = KnownAnswerModel(truth, VOLUME, WINDOW)
    affine = np.diag([-1.5, -1.5, 1.5, 1.0])
    affine[:3, 3] = [30.0, 20.0, -10.0]
    prepared = inference.PreparedCT(coded_volume(VOLUME), affine, VOLUME, affine)
    target_voxel = np.array([30.0, 10.0, 5.0])
    out = inference.predict_window(model, prepared, centre_ras=spatial.voxel_to_ras(target_voxel, affine))
    assert out.offset == (22, 2, 0)  # centred where possible, clamped inside the volume on k
    vox = out.gaussians.centres[0].numpy() * (np.array(VOLUME) - 1)
    keep = out.gaussians.intensities[0].numpy() > 0
    assert np.all((vox[keep] >= out.offset) & (vox[keep] <= np.array(out.offset) + 15))


def test_extract_window_pads_outside_with_zeros():
    vol = coded_volume((5, 6, 7))
    w = inference.extract_window(vol, (-2, 3, 1), (4, 4, 4))
    assert bool((w[:2] == 0).all()) and bool((w[2:, :3, :] != 0).all()) and bool((w[:, 3:] == 0).all())
    assert decode_offset(w) == (-2, 3, 1)


def test_prepare_ct_keeps_world_positions_for_an_lps_oblique_ct():
    """A bright cube in a 3 mm LPS-flipped oblique CT lands at the same RAS point after preparation at 1.5 mm."""
    shape = (30, 26, 20)
    hu = np.full(shape, -1000.0, np.float32)
    hu[3:27, 3:23, 2:18] = 40.0  # body
    hu[10:14, 8:12, 6:10] = 1000.0  # bright cube, centre voxel (11.5, 9.5, 7.5)
    c, s = np.cos(0.25), np.sin(0.25)
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-1.0, 1.0, -1.0]) @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) * 3.0
    affine[:3, 3] = [50.0, -20.0, 100.0]
    prepared = inference.prepare_ct(hu, affine)
    np.testing.assert_allclose(spatial.spacing_of(prepared.ijk_to_ras), 1.5, atol=1e-6)
    vol = prepared.volume.numpy()
    assert vol.min() >= 0 and vol.max() <= 1
    bright = np.argwhere(vol > 0.99)
    got = spatial.voxel_to_ras(bright.mean(0), prepared.ijk_to_ras)
    want = spatial.voxel_to_ras([11.5, 9.5, 7.5], affine)
    assert np.linalg.norm(got - want) < 1.5
    with pytest.raises(ValueError, match="3D"):
        inference.prepare_ct(hu[0], affine)


def test_prepare_ct_on_a_real_ct(small_real_ct):
    import nibabel as nib

    img = nib.load(str(small_real_ct))
    prepared = inference.prepare_ct(np.asarray(img.dataobj), img.affine)
    assert prepared.source_shape == (122, 101, 30)
    np.testing.assert_allclose(spatial.spacing_of(prepared.ijk_to_ras), 1.5, atol=1e-6)
    assert all(abs(n - 2 * m) <= 2 for n, m in zip(prepared.shape, (122, 101, 30)))
    assert 0.05 < float(prepared.volume.mean()) < 0.9


def test_prepare_ct_rejects_non_ct_unless_told():
    from medgmae_core.data.transforms import NotCTError

    values = np.random.default_rng(0).uniform(0, 1, (20, 20, 10)).astype(np.float32)  # normalised, not HU
    with pytest.raises(NotCTError):
        inference.prepare_ct(values, np.eye(4))
    prepared = inference.prepare_ct(values, np.diag([1.5, 1.5, 1.5, 1.0]), check_ct=False)
    assert prepared.shape == (20, 20, 10)


def _ramp_ct(shape, affine, grad=(3.0, -2.0, 1.5), base=20.0):
    """A HU field linear in RAS (values stay inside the HU window), plus air and fat so it passes the CT check."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(np.float64)
    hu = (spatial.voxel_to_ras(ijk, affine) - affine[:3, 3]) @ np.asarray(grad) + base
    return hu.astype(np.float32), np.asarray(grad), base


def test_prepare_ct_resamples_exactly_for_a_linear_field():
    """Trilinear resampling reproduces a field linear in RAS exactly: every prepared voxel must hold the windowed
    value of the field at its own RAS position (checks orientation, spacing and the new affine together)."""
    c, s = np.cos(0.2), np.sin(0.2)
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([3.0, 2.5, 3.0])
    affine[:3, 3] = [30.0, -10.0, 5.0]
    hu, grad, base = _ramp_ct((12, 10, 8), affine, grad=(1.0, -1.5, 2.0))
    prepared = inference.prepare_ct(hu, affine, check_ct=False)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in prepared.shape], indexing="ij"), -1)
    want = ((spatial.voxel_to_ras(ijk, prepared.ijk_to_ras) - affine[:3, 3]) @ grad + base + 175.0) / 425.0
    np.testing.assert_allclose(prepared.volume.numpy(), np.clip(want, 0, 1), atol=2e-5)
    # RAS-closest orientation: the affine's diagonal points along +R, +A, +S
    assert np.all(np.diag(prepared.ijk_to_ras)[:3] > 0)


def test_prepare_ct_matches_monai_inference_transforms_without_resampling():
    """Reference: the MONAI pipeline of data.transforms (same orientation and window when no resampling)."""
    from monai.data import MetaTensor

    from medgmae_core.data.transforms import inference_transforms

    affine = np.diag([-1.5, 1.5, -1.5, 1.0])
    affine[:3, 3] = [10.0, 20.0, 30.0]
    hu = np.random.default_rng(0).uniform(-1000, 400, (14, 12, 10)).astype(np.float32)
    ours = inference.prepare_ct(hu, affine)
    ref = inference_transforms(1.5, load=False)({"image": MetaTensor(torch.from_numpy(hu)[None],
                                                                     affine=torch.from_numpy(affine))})["image"]
    np.testing.assert_allclose(ours.volume.numpy(), np.asarray(ref[0]), atol=1e-6)
    np.testing.assert_allclose(ours.ijk_to_ras, np.asarray(ref.affine), atol=1e-6)


def test_merged_gaussians_are_centred_inside_the_ct():
    """Issue 10 item 9: windows padded past the CT's edge predict Gaussians in the padding; none is kept."""
    volume = torch.rand(20, 12, 9)  # smaller than the window on every axis: one centred, zero-padded window
    k = 64

    class Everywhere(KnownAnswerModel):
        def predict_gaussians(self, x, mask_ratio=0.0, generator=None):
            g = torch.Generator().manual_seed(1)
            return GaussianSet.random(x.shape[0], k, sigma_range=(0.02, 0.06), generator=g)  # all over the window

    model = Everywhere(known_gaussians(), volume.shape, WINDOW)
    result = inference.predict_volume(model, volume, overlap=0)
    vox = result.gaussians.centres[0].double() * (torch.tensor(volume.shape) - 1)
    assert 0 < result.gaussians.num_gaussians < k  # some fell in the padding and were dropped
    assert bool(((vox >= -0.5) & (vox <= torch.tensor(volume.shape) - 0.5)).all())
