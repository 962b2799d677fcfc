"""Analytic Gaussian projector and the ray-driven voxel projector.

Checks: analytic splat vs ray-projecting the rendered volume (parallel <= 2%,
cone <= 3% relative L2: the cone splat is a local-affine approximation), fast
backends vs the dense reference in values and gradients, gradcheck in float64,
mass conservation for a rotated elongated Gaussian, the adjoint dot-product test.
"""
from __future__ import annotations

import math

import pytest
import torch

from medgmae_core.gaussians import GaussianSet
from medgmae_core.numba_support import numba_available
from medgmae_core.render import render_volume
from medgmae_core.xray import (ConeBeam, ParallelBeam, backproject, project_gaussians, project_volume,
                               resolve_projector_backend)

FAST = ["torch"] + (["numba"] if numba_available() else [])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def geometries(shape, views, spacing=1.0):
    return [ParallelBeam.for_volume(shape, spacing, views), ConeBeam.for_volume(shape, spacing, views)]


def interior_gaussians(k: int, seed: int, dtype=torch.float64, sigma=(0.04, 0.12)) -> GaussianSet:
    g = GaussianSet.random(1, k, sigma_range=sigma, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return GaussianSet(0.3 + 0.4 * g.centres, g.scales, g.quaternions, g.intensities)


@pytest.mark.parametrize("geom, tol", [(0, 0.02), (1, 0.03)], ids=["parallel", "cone"])
def test_analytic_projection_matches_projecting_the_rendered_volume(geom, tol):
    shape = (40, 40, 40)
    geom = geometries(shape, 10)[geom]
    g = interior_gaussians(8, seed=1)
    analytic = project_gaussians(g, geom)
    voxel = project_volume(render_volume(g, shape), geom)
    assert rel(analytic, voxel) < tol
    assert float(analytic.sum() / voxel.sum()) == pytest.approx(1.0, abs=tol)


def test_rotated_elongated_gaussian_is_not_clipped_and_conserves_mass():
    """Each parallel view's integral over the detector equals the 3D mass I (2 pi)^1.5 sqrt(det Sigma_mm)."""
    shape = (48, 48, 48)
    geom = ParallelBeam.for_volume(shape, 1.0, 6)
    q = torch.tensor([[[0.8, 0.3, -0.4, 0.33]]], dtype=torch.float64)
    g = GaussianSet(torch.full((1, 1, 3), 0.5, dtype=torch.float64),
                    torch.tensor([[[0.16, 0.02, 0.05]]], dtype=torch.float64), q, torch.ones(1, 1, dtype=torch.float64))
    extent = torch.tensor(geom.volume_extent_mm, dtype=torch.float64)
    mass = (2 * math.pi) ** 1.5 * float((g.scales[0, 0] * extent).prod())
    dv, du = geom.detector_spacing
    for backend in ["reference"] + FAST:
        proj = project_gaussians(g, geom, backend=backend, cutoff=5.0)
        per_view = proj.sum((-1, -2))[0] * du * dv
        assert torch.allclose(per_view, torch.full_like(per_view, mass), rtol=2e-3), backend


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("kind", [0, 1], ids=["parallel", "cone"])
def test_fast_backends_match_reference_values_and_gradients(backend, kind):
    shape = (32, 32, 24)
    geom = geometries(shape, 7)[kind]
    base = GaussianSet.random(2, 24, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    weights = torch.randn(2, geom.n_views, *geom.detector_shape, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(4))
    results = {}
    for name in ("reference", backend):
        params = [t.clone().requires_grad_(True) for t in base.tensors()]
        out = project_gaussians(GaussianSet(*params), geom, backend=name)
        (out * weights).sum().backward()
        results[name] = (out.detach(), [p.grad for p in params])
    (ref, ref_grads), (fast, fast_grads) = results["reference"], results[backend]
    assert rel(fast, ref) < 1e-9
    for name, a, b in zip(("centres", "scales", "quaternions", "intensities"), fast_grads, ref_grads):
        assert rel(a, b) < 1e-7, name


@pytest.mark.parametrize("backend", FAST)
def test_fast_backends_float32_close_to_float64_reference(backend):
    shape = (32, 32, 24)
    geom = ParallelBeam.for_volume(shape, 1.0, 5)
    g = GaussianSet.random(1, 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ref = project_gaussians(g, geom, backend="reference")
    fast = project_gaussians(g.to(dtype=torch.float32), geom, backend=backend)
    assert fast.dtype == torch.float32
    assert rel(fast.double(), ref) < 2e-4  # float32 stage 1 rounding, and cutoff-edge pixels that flip


@pytest.mark.parametrize("backend", ["reference"] + FAST)
@pytest.mark.parametrize("kind", [0, 1], ids=["parallel", "cone"])
def test_gradcheck_float64(backend, kind):
    """Full Jacobian, via 4 random projections of the output (cutoff 8 keeps the hard edge negligible)."""
    geom = geometries((10, 10, 10), 3)[kind]
    g = GaussianSet.random(1, 2, sigma_range=(0.08, 0.15), generator=torch.Generator().manual_seed(6),
                           dtype=torch.float64)
    mix = torch.randn(geom.n_views * geom.rows * geom.cols, 4, dtype=torch.float64,
                      generator=torch.Generator().manual_seed(7))

    def fn(*params):
        return project_gaussians(GaussianSet(*params), geom, backend=backend, cutoff=8.0).reshape(-1) @ mix

    params = [t.clone().requires_grad_(True) for t in g.tensors()]
    fast_mode = backend == "torch"  # its per-call bucketing overhead makes the full Jacobian slow; random directions
    assert torch.autograd.gradcheck(fn, params, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=fast_mode)


def test_view_chunking_with_recompute_gives_identical_values_and_gradients():
    geom = ParallelBeam.for_volume((24, 24, 16), 1.0, 9)
    base = GaussianSet.random(1, 16, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    grads = []
    outs = []
    for chunk_mb in (1e3, 1e-4):  # one chunk / one view per chunk (checkpointed)
        params = [t.clone().requires_grad_(True) for t in base.tensors()]
        out = project_gaussians(GaussianSet(*params), geom, backend=FAST[-1], max_chunk_mb=chunk_mb)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append([p.grad for p in params])
    assert torch.allclose(outs[0], outs[1], rtol=1e-12, atol=1e-12)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_backend_resolution(monkeypatch):
    g = GaussianSet.random(1, 2)
    assert resolve_projector_backend(g, "torch") == "torch"
    assert resolve_projector_backend(g) == ("numba" if numba_available() else "torch")
    monkeypatch.setenv("MEDGMAE_DISABLE_NUMBA", "1")
    assert resolve_projector_backend(g) == "torch"
    with pytest.raises(ValueError, match="backend"):
        resolve_projector_backend(g, "cuda-magic")
    with pytest.raises(ValueError, match="cutoff"):
        project_gaussians(g, ParallelBeam.for_volume((8, 8, 8), 1.0, 2), cutoff=0.0)


@pytest.mark.parametrize("kind", [0, 1], ids=["parallel", "cone"])
def test_voxel_projector_adjoint_dot_product(kind):
    shape = (14, 12, 9)
    geom = geometries(shape, 5, spacing=(1.0, 1.5, 2.0))[kind]
    gen = torch.Generator().manual_seed(9)
    x = torch.rand(2, *shape, dtype=torch.float64, generator=gen)
    y = torch.rand(2, geom.n_views, *geom.detector_shape, dtype=torch.float64, generator=gen)
    ax_y = (project_volume(x, geom, max_samples=5000) * y).sum()  # small blocks: exercises the chunking
    x_aty = (x * backproject(y, geom, shape)).sum()
    assert float(ax_y) == pytest.approx(float(x_aty), rel=1e-12)
    # the autograd path of project_volume is that same adjoint
    x.requires_grad_(True)
    (project_volume(x, geom) * y).sum().backward()
    assert torch.allclose(x.grad, backproject(y, geom, shape), rtol=1e-12, atol=1e-12)


def test_voxel_projector_line_integral_of_a_ball():
    """Central ray through a ball of radius 20 mm integrates to its 40 mm chord (both beams)."""
    n = 48
    axis = torch.linspace(-(n - 1) / 2, (n - 1) / 2, n)
    x, y, z = torch.meshgrid(axis, axis, axis, indexing="ij")
    ball = ((x**2 + y**2 + z**2) <= 20**2).float()[None]
    for geom in geometries((n, n, n), 3):
        centre = project_volume(ball, geom)[0, :, geom.rows // 2, int(geom.axis_column)]
        assert torch.allclose(centre, torch.full_like(centre, 40.0), atol=0.5)


def test_voxel_projector_rejects_bad_inputs():
    geom = ParallelBeam.for_volume((8, 8, 8), 1.0, 2)
    with pytest.raises(ValueError, match="volume"):
        project_volume(torch.zeros(8, 8, 8), geom)
    with pytest.raises(ValueError, match="angles has 2 views"):
        backproject(torch.zeros(1, 3, *geom.detector_shape), geom, (8, 8, 8))


@pytest.mark.skipif(not numba_available(), reason="numba unavailable")
@pytest.mark.parametrize("kind", [0, 1], ids=["parallel", "cone"])
def test_numba_stage1_matches_torch_stage1_values_and_gradients(kind):
    """The fused numba stage 1 (hand-derived backward) against the torch ``splat_params`` (autograd)."""
    from medgmae_core.xray.gaussian_projector import gaussians_mm, splat_params, splat_params_numba

    geom = geometries((24, 20, 16), 5)[kind]
    g = GaussianSet.random(2, 9, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    weights = torch.randn(2, 5, 9, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    results = []
    for stage1 in (splat_params, splat_params_numba):
        leaves = [t.clone().requires_grad_(True) for t in (*gaussians_mm(g, geom), g.intensities)]
        out = stage1(*leaves, geom, slice(1, 4))
        (out * weights[:, 1:4]).sum().backward()
        results.append((out.detach(), [t.grad for t in leaves]))
    (ref, ref_grads), (fast, fast_grads) = results
    assert fast.shape == ref.shape == (2, 3, 9, 6)
    assert rel(fast, ref) < 1e-12
    for name, a, b in zip(("means", "cov", "det3", "intensities"), fast_grads, ref_grads):
        assert rel(a, b) < 1e-10, name
