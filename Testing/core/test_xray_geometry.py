"""Scan geometry: coverage, volume<->mm mapping, and clear errors for bad geometry."""
from __future__ import annotations

import math

import pytest
import torch

from medgmae_core.xray import ConeBeam, GeometryError, ParallelBeam, project_gaussians
from medgmae_core.gaussians import GaussianSet

SHAPE = (24, 20, 6)


def test_for_volume_covers_the_volume_and_validates():
    par = ParallelBeam.for_volume(SHAPE, 1.5, 30)
    cone = ConeBeam.for_volume(SHAPE, 1.5, 30)
    for geom in (par, cone):
        geom.validate(SHAPE)
        (u_lo, u_hi), (v_lo, v_hi) = geom.volume_footprint_mm()
        (du_lo, du_hi), (dv_lo, dv_hi) = geom.detector_bounds_mm()
        assert du_lo <= u_lo and u_hi <= du_hi and dv_lo - 1e-9 <= v_lo and v_hi <= dv_hi + 1e-9
    assert par.volume_extent_mm == (23 * 1.5, 19 * 1.5, 5 * 1.5)
    assert par.rows == SHAPE[2]  # parallel rows sit on the slices
    assert par.n_views == 30 and float(par.angles[1] - par.angles[0]) == pytest.approx(math.pi / 30)


def test_volume_mapping_is_centred_on_the_rotation_axis():
    geom = ParallelBeam.for_volume(SHAPE, (1.0, 2.0, 3.0), 4)
    pts = torch.tensor([[0.5, 0.5, 0.5], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    mm = geom.to_mm(pts)
    assert torch.allclose(mm[0], torch.zeros(3, dtype=torch.float64))
    assert torch.allclose(mm[2], torch.tensor([23 * 1.0 / 2, 19 * 2.0 / 2, 5 * 3.0 / 2], dtype=torch.float64))
    assert torch.allclose(geom.from_mm(mm), pts)


@pytest.mark.parametrize("offset", [0.0, -3.0, 4.5])
def test_rotation_axis_projects_to_axis_column(offset):
    """A small Gaussian on the axis lands on column (cols-1)/2 + offset in every view, for both beams."""
    for geom in (ParallelBeam.for_volume(SHAPE, 1.5, 8, detector_offset=offset),
                 ConeBeam.for_volume(SHAPE, 1.5, 8, detector_offset=offset)):
        g = GaussianSet.isotropic(torch.full((1, 1, 3), 0.5, dtype=torch.float64), 0.05,
                                  torch.ones(1, 1, dtype=torch.float64))
        proj = project_gaussians(g, geom, backend="reference")[0]  # [V, rows, cols]
        cols = torch.arange(geom.cols, dtype=torch.float64)
        centroid = (proj.sum(1) * cols).sum(-1) / proj.sum((1, 2))  # [V]
        assert torch.allclose(centroid, torch.full_like(centroid, geom.axis_column), atol=1e-6)


def _projections(geom, views=None):
    return torch.zeros(1, views or geom.n_views, *geom.detector_shape)


@pytest.mark.parametrize("make, name", [
    (lambda: ParallelBeam(torch.zeros(3), (4, 5), (1.0, 1.0), (100.0, 100.0, 3.0)).validate(), "detector_shape"),
    (lambda: ParallelBeam(torch.zeros(3), (4, 300), (1.0, 1.0), (100.0, 100.0, 30.0)).validate(), "detector_shape"),
    (lambda: ParallelBeam([0.0, float("nan")], (4, 5), (1.0, 1.0), (3.0, 3.0, 3.0)), "angles"),
    (lambda: ParallelBeam([], (4, 5), (1.0, 1.0), (3.0, 3.0, 3.0)), "angles"),
    (lambda: ParallelBeam([0.0], (4, 5), (0.0, 1.0), (3.0, 3.0, 3.0)), "detector_spacing"),
    (lambda: ParallelBeam([0.0], (0, 5), (1.0, 1.0), (3.0, 3.0, 3.0)), "detector_shape"),
    (lambda: ParallelBeam([0.0], (4, 5), (1.0, 1.0), (3.0, -3.0, 3.0)), "volume_extent_mm"),
    (lambda: ConeBeam.for_volume(SHAPE, 1.5, 4, source_to_origin=0.0), "source_to_origin"),
    (lambda: ConeBeam.for_volume(SHAPE, 1.5, 4, source_to_origin=100.0, source_to_detector=-5.0), "source_to_detector"),
    (lambda: ConeBeam.for_volume(SHAPE, 1.5, 4, source_to_origin=10.0, source_to_detector=20.0).validate(), "source_to_origin"),
    (lambda: ConeBeam(torch.zeros(4), (3, 3), (1.0, 1.0), (30.0, 30.0, 30.0), source_to_origin=100.0,
                      source_to_detector=200.0).validate(), "detector_shape"),
])
def test_bad_geometry_is_rejected_naming_the_parameter(make, name):
    with pytest.raises(GeometryError, match=name):
        make()


def test_projection_count_and_detector_mismatch_are_rejected():
    geom = ParallelBeam.for_volume(SHAPE, 1.5, 10)
    geom.validate(SHAPE, _projections(geom))
    with pytest.raises(GeometryError, match=r"angles has 10 views but projections has 9"):
        geom.validate(SHAPE, _projections(geom, views=9))
    with pytest.raises(GeometryError, match="detector_shape"):
        geom.validate(SHAPE, torch.zeros(10, geom.rows + 1, geom.cols))
    with pytest.raises(GeometryError, match="volume_shape"):
        geom.validate((24, 20))


def test_truncated_detector_can_be_allowed_explicitly():
    geom = ParallelBeam(torch.zeros(3), (4, 5), (1.0, 1.0), (100.0, 100.0, 3.0))
    assert geom.validate(allow_truncation=True) is geom
