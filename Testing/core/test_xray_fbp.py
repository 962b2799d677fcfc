"""FBP / FDK: scaling, filters, detector offset, on a real CT crop and a cone-beam phantom.

Stated thresholds (measured values in brackets, 64^2 x 4 crop of example_ct_sm, 90 views):
ram-lak PSNR >= 31 dB [33.6], shepp-logan >= 30 [32.4], cosine/hann >= 27 [~29];
FDK on a 32^3 ellipsoid phantom, 60 views: PSNR >= 22 dB and the mean within 3%.
"""
from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medgmae_core.xray import ConeBeam, GeometryError, ParallelBeam, fbp, fdk, project_volume, reconstruct_analytic

HU_WINDOW = (-175.0, 250.0)


def psnr(x: torch.Tensor, ref: torch.Tensor, peak: float = 1.0) -> float:
    return 10 * math.log10(peak**2 / float(((x - ref) ** 2).mean()))


@pytest.fixture(scope="module")
def ct_crop(shared_ct):
    """[1, 64, 64, 4] HU-windowed [0,1] slab of a real CT (axes D=x, H=y, W=z), and its spacing in mm."""
    image = nib.load(str(shared_ct / "totalsegmentator" / "example_ct_sm.nii.gz"))
    hu = np.asarray(image.dataobj, dtype=np.float32)[:, :, 13:17]  # 122 x 101 x 4, 3 mm
    x = torch.from_numpy(np.clip((hu - HU_WINDOW[0]) / (HU_WINDOW[1] - HU_WINDOW[0]), 0, 1))
    x = F.interpolate(x.permute(2, 0, 1)[:, None], size=(64, 64), mode="area")[:, 0].permute(1, 2, 0)
    zooms = image.header.get_zooms()
    spacing = (hu.shape[0] * zooms[0] / 64, hu.shape[1] * zooms[1] / 64, float(zooms[2]))
    return x[None].contiguous(), spacing


@pytest.fixture(scope="module")
def ct_scan(ct_crop):
    x, spacing = ct_crop
    geom = ParallelBeam.for_volume(tuple(x.shape[1:]), spacing, 90)
    return x, geom, project_volume(x, geom)


@pytest.mark.parametrize("filt, threshold", [("ram-lak", 31.0), ("shepp-logan", 30.0), ("cosine", 27.0), ("hann", 27.0)])
def test_fbp_of_simulated_parallel_scan_of_real_ct(ct_scan, filt, threshold):
    x, geom, proj = ct_scan
    recon = fbp(proj, geom, tuple(x.shape[1:]), filter=filt)
    assert recon.shape == x.shape
    assert psnr(recon, x) >= threshold
    assert float(recon.mean()) == pytest.approx(float(x.mean()), rel=0.02)  # scaling is right


def test_fbp_handles_detector_column_offset(ct_crop):
    x, spacing = ct_crop
    shape = tuple(x.shape[1:])
    geom = ParallelBeam.for_volume(shape, spacing, 90, detector_offset=-6.0)  # axis 6 columns left of centre
    proj = project_volume(x, geom)
    assert psnr(fbp(proj, geom, shape), x) >= 31.0
    centred = geom.copy_with(detector_offset=0.0)  # ignoring the offset blurs the image badly
    assert psnr(fbp(proj, centred, shape), x) < 25.0


def test_unbatched_input_and_dispatch(ct_scan):
    x, geom, proj = ct_scan
    shape = tuple(x.shape[1:])
    single = reconstruct_analytic(proj[0], geom, shape)
    assert single.shape == shape
    assert torch.allclose(single, fbp(proj, geom, shape)[0], atol=1e-6)


def ellipsoid_phantom(n: int, spacing: float) -> torch.Tensor:
    axis = (torch.arange(n) - (n - 1) / 2) * spacing
    x, y, z = torch.meshgrid(axis, axis, axis, indexing="ij")
    r = (n - 1) / 2 * spacing
    body = (x / (0.8 * r)) ** 2 + (y / (0.6 * r)) ** 2 + (z / (0.7 * r)) ** 2 <= 1
    blob = (x - 0.2 * r) ** 2 + y**2 + (z - 0.1 * r) ** 2 <= (0.25 * r) ** 2
    small = (x + 0.3 * r) ** 2 + (y + 0.2 * r) ** 2 + (z + 0.25 * r) ** 2 <= (0.18 * r) ** 2
    return (0.5 * body + 0.4 * blob + 0.3 * small).float()[None]


def test_fdk_reconstructs_cone_scan_of_phantom():
    n, spacing = 32, 2.0
    phantom = ellipsoid_phantom(n, spacing)
    geom = ConeBeam.for_volume((n, n, n), spacing, 60)
    proj = project_volume(phantom, geom)
    recon = fdk(proj, geom, (n, n, n))
    assert psnr(recon, phantom) >= 22.0
    assert float(recon.mean()) == pytest.approx(float(phantom.mean()), rel=0.03)
    assert torch.allclose(reconstruct_analytic(proj, geom, (n, n, n)), recon)


def test_analytic_reconstruction_rejects_bad_inputs(ct_scan):
    x, geom, proj = ct_scan
    shape = tuple(x.shape[1:])
    with pytest.raises(ValueError, match="filter"):
        fbp(proj, geom, shape, filter="butterworth")
    with pytest.raises(GeometryError, match="angles has 90 views but projections has 89"):
        fbp(proj[:, :89], geom, shape)
    with pytest.raises(GeometryError, match="ConeBeam"):
        fdk(proj, geom, shape)
    with pytest.raises(ValueError, match="shape"):
        fbp(proj, geom, (64, 64))
