"""Renderer: every fast path against the dense reference, gradients, cut-off, mass, conventions, bad inputs."""
from __future__ import annotations

import logging
import math

import pytest
import torch

from medgmae_core.gaussians import GaussianSet, GaussianValidationError, covariance_from
from medgmae_core.numba_support import numba_available
from medgmae_core.render import BACKEND_ENV, render_reference, render_volume, resolve_backend
from medgmae_core.render.conventions import get_convention
from medgmae_core.render.geometry import clip_boxes, render_inputs
from medgmae_core.render.tiles import render_tiles

FAST = ["torch", pytest.param("numba", marks=pytest.mark.skipif(not numba_available(), reason="numba missing"))]
CHI2_3DOF_AT_9 = 0.9707091134651118  # P(chi^2_3 <= 3^2): mass inside the 3-sigma ellipsoid


def random_set(batch=2, k=12, seed=0, dtype=torch.float64, sigma_range=(0.05, 0.2)) -> GaussianSet:
    return GaussianSet.random(batch, k, generator=torch.Generator().manual_seed(seed), dtype=dtype,
                              sigma_range=sigma_range)


def single(centre, scales, quat, intensity=1.0, dtype=torch.float64) -> GaussianSet:
    t = lambda v: torch.tensor(v, dtype=dtype)[None, None]  # noqa: E731
    return GaussianSet(t(centre), t(scales), t(quat), torch.tensor([[intensity]], dtype=dtype))


def assert_matches_reference(out, ref, gaussians, conv_name, radius, atol):
    """Equal up to ``atol`` except a handful of boundary voxels that differ by one edge term.

    A hard cut-off lets two correct implementations disagree on a voxel lying exactly on the
    ellipsoid (or box) boundary; such a voxel differs by at most c*I*exp(-r^2/2) (for the
    release box the edge term is bounded by c*I).
    """
    conv = get_convention(conv_name)
    diff = (out - ref).abs()
    bad = diff > atol
    edge = conv.amplitude * float(gaussians.intensities.abs().max())
    if math.isfinite(radius):
        edge *= math.exp(-0.5 * radius * radius)
    assert int(bad.sum()) <= 3, f"{int(bad.sum())} voxels differ by more than {atol}; max {float(diff.max())}"
    assert float(diff.max()) <= edge * 1.001 + atol


# ------------------------------------------------------------------ values
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("convention,cutoff", [("paper", 3.0), ("paper", None), ("release", 3.0)])
def test_fast_paths_match_reference(backend, dtype, atol, convention, cutoff):
    g = random_set(batch=2, k=15, seed=1, dtype=dtype)
    shape = (19, 14, 23)  # non-cubic, odd (not a multiple of the tile size)
    ref = render_reference(g, shape, cutoff=cutoff, convention=convention)
    out = render_volume(g, shape, cutoff=cutoff, convention=convention, backend=backend)
    assert out.shape == (2, *shape) and out.dtype == dtype
    radius = 3.0 if (cutoff and convention == "paper") else math.inf
    assert_matches_reference(out, ref, g, convention, radius, atol)
    assert float(ref.abs().max()) > 0.1  # the case is not trivially empty


@pytest.mark.parametrize("backend", FAST)
def test_fast_paths_match_reference_at_scale_float32(backend):
    """Many small anisotropic Gaussians at 32^3 (the benchmark's regime), with boundary-flip tolerance."""
    g = random_set(batch=1, k=150, seed=3, dtype=torch.float32, sigma_range=(0.02, 0.1))
    shape = (32, 32, 32)
    ref = render_reference(g.to(torch.float64), shape).float()
    out = render_volume(g, shape, backend=backend)
    assert_matches_reference(out, ref, g, "paper", 3.0, atol=2e-5)


def test_tile_chunking_does_not_change_the_result():
    g = random_set(batch=2, k=10, seed=4)
    shape = (17, 9, 12)
    conv = get_convention("paper")
    centres, prec, amps = render_inputs(g, conv)
    clip = clip_boxes(g, shape, conv)
    whole = render_tiles(centres, prec, amps, clip, shape, 3.0)
    tiny = render_tiles(centres, prec, amps, clip, shape, 3.0, max_chunk_elements=512 * 20)
    torch.testing.assert_close(whole, tiny, rtol=0, atol=1e-13)


# --------------------------------------------------------------- gradients
def _grads(g: GaussianSet, shape, weight, backend, convention):
    leaves = g.map(lambda t: t.clone().requires_grad_())
    if backend == "reference":
        out = render_reference(leaves, shape, convention=convention)
    else:
        out = render_volume(leaves, shape, convention=convention, backend=backend)
    (out * weight).sum().backward()
    return [t.grad for t in leaves.tensors()]


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("convention", ["paper", "release"])
def test_fast_path_gradients_match_reference(backend, convention):
    g = random_set(batch=2, k=8, seed=5)
    shape = (13, 11, 10)
    weight = torch.randn(2, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = _grads(g, shape, weight, "reference", convention)
    out = _grads(g, shape, weight, backend, convention)
    for name, a, b in zip(("centres", "scales", "quaternions", "intensities"), out, ref):
        assert float(b.abs().max()) > 0, name
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", ["reference", *FAST])
@pytest.mark.parametrize("convention", ["paper", "release"])
def test_gradcheck_float64(backend, convention):
    g = single([0.45, 0.5, 0.55], [0.18, 0.12, 0.22], [0.9, 0.3, -0.2, 0.25], 0.8)
    g = GaussianSet.cat([g, single([0.6, 0.4, 0.5], [0.15, 0.17, 0.1], [0.7, -0.1, 0.5, 0.4], 1.2)])
    shape = (7, 8, 6)

    def fn(centres, scales, quats, intens):
        gs = GaussianSet(centres, scales, quats, intens)
        if backend == "reference":
            return render_reference(gs, shape, convention=convention)
        return render_volume(gs, shape, convention=convention, backend=backend)

    inputs = tuple(t.clone().requires_grad_() for t in g.tensors())
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


# ---------------------------------------------------------- cut-off shape
def _elongated_rotated() -> GaussianSet:
    """Long axis 0.22, short axes 0.03/0.04, rotated 45 degrees about (1,1,1)/sqrt(3)."""
    angle = math.pi / 4
    axis = torch.tensor([1.0, 1.0, 1.0]) / math.sqrt(3)
    quat = [math.cos(angle / 2), *(math.sin(angle / 2) * axis).tolist()]
    return single([0.5, 0.5, 0.5], [0.22, 0.03, 0.04], quat, 1.0)


@pytest.mark.parametrize("backend", ["reference", *FAST])
def test_rotated_elongated_gaussian_is_not_clipped(backend):
    g = _elongated_rotated()
    shape = (33, 33, 33)
    full = render_reference(g, shape, cutoff=None)
    cut = render_volume(g, shape, cutoff=3.0, backend=backend) if backend != "reference" else \
        render_reference(g, shape, cutoff=3.0)
    # only tails beyond 3 sigma are missing: pointwise at most I*exp(-4.5), mass ~ chi^2_3(9)
    assert float((full - cut).max()) <= math.exp(-4.5) + 1e-12
    assert float((full - cut).min()) >= -1e-12
    assert cut.sum() / full.sum() == pytest.approx(CHI2_3DOF_AT_9, abs=0.01)
    # and the long axis really is rotated off the grid axes (a box of +-3 s_a would not contain it)
    cov = covariance_from(g.scales, g.quaternions)[0, 0]
    assert float(cov[0, 1].abs()) > 0.1 * float(cov[0, 0])


@pytest.mark.parametrize("backend", ["reference", *FAST])
def test_release_convention_clips_the_rotated_gaussian(backend):
    g = _elongated_rotated()
    shape = (33, 33, 33)
    # the release conjugates the quaternion: give it the conjugate so both render the same ellipsoid
    conj = GaussianSet(g.centres, g.scales, g.quaternions * torch.tensor([1.0, -1, -1, -1], dtype=g.dtype),
                       g.intensities)
    full = render_reference(g, shape, cutoff=None)
    release = render_volume(conj, shape, convention="release", backend=backend) if backend != "reference" else \
        render_reference(conj, shape, convention="release")
    ratio = float(release.sum() / (0.1 * full.sum()))
    assert ratio < 0.6, f"release box kept {ratio:.2f} of the mass; expected it to clip the rotated Gaussian"
    # inside its box it is the same Gaussian with c = 0.1
    kept = release > 0
    torch.testing.assert_close(release[kept], 0.1 * full[kept], rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------- mass
def _render(g, shape, backend, **kwargs):
    if backend == "reference":
        return render_reference(g, shape, **kwargs)
    return render_volume(g, shape, backend=backend, **kwargs)


@pytest.mark.parametrize("backend", ["reference", *FAST])
def test_total_mass_matches_closed_form(backend):
    """sum over voxels = c*I*(2pi)^{3/2}*sqrt(det Sigma_vox), Sigma_vox = S Sigma S with S = diag(N-1)."""
    shape = (41, 37, 45)
    g = single([0.5, 0.48, 0.52], [0.07, 0.09, 0.06], [0.8, 0.2, -0.4, 0.3], 0.7)
    scale = torch.tensor([n - 1 for n in shape], dtype=torch.float64)
    sigma_vox = covariance_from(g.scales, g.quaternions)[0, 0] * scale[:, None] * scale[None, :]
    closed = 0.7 * (2 * math.pi) ** 1.5 * math.sqrt(float(torch.linalg.det(sigma_vox)))
    # sigma is 2.2-3.6 voxels: the Riemann sum is exact to far below 1e-4
    assert float(_render(g, shape, backend, cutoff=None).sum()) == pytest.approx(closed, rel=1e-4)
    # inside the 3-sigma ellipsoid: the chi^2_3 fraction, up to discretisation of the boundary
    assert float(_render(g, shape, backend, cutoff=3.0).sum()) == pytest.approx(closed * CHI2_3DOF_AT_9, rel=5e-3)


@pytest.mark.parametrize("backend", ["reference", *FAST])
def test_release_mass_is_c_times_the_boxed_gaussian(backend):
    """Axis-aligned Gaussian: the release render is 0.1 * I * prod_a (1D sum over the voxels of axis a in the
    release kernel's box: int(m*N - 2*s*N) .. int(m*N + 2*s*N), centred at m*N, not m*(N-1))."""
    shape = (41, 37, 45)
    centre, scales = [0.5, 0.48, 0.53], [0.07, 0.09, 0.06]
    g = single(centre, scales, [1.0, 0, 0, 0], 0.7)
    expected = 0.1 * 0.7
    for n, m, s in zip(shape, centre, scales):
        lo, hi = max(0, int(m * n - 2 * s * n)), min(n - 1, int(m * n + 2 * s * n))  # no end near an integer
        x = torch.arange(lo, hi + 1, dtype=torch.float64) / (n - 1)
        expected *= float(torch.exp(-0.5 * ((x - m) / s) ** 2).sum())
    assert float(_render(g, shape, backend, convention="release").sum()) == pytest.approx(expected, rel=1e-9)


# -------------------------------------------------------- determinism
@pytest.mark.skipif(not numba_available(), reason="numba missing")
def test_numba_is_bit_identical_across_thread_counts():
    from medgmae_core.numba_support import get_num_threads, set_num_threads
    g = random_set(batch=2, k=40, seed=7, dtype=torch.float32, sigma_range=(0.03, 0.15))
    weight = torch.rand(2, 24, 20, 22, generator=torch.Generator().manual_seed(0))

    def run():
        leaves = g.map(lambda t: t.clone().requires_grad_())
        out = render_volume(leaves, (24, 20, 22), backend="numba")
        (out * weight).sum().backward()
        return [out.detach(), *(t.grad for t in leaves.tensors())]

    before = get_num_threads()
    try:
        set_num_threads(1)
        one = run()
        set_num_threads(max(2, before))
        many = run()
    finally:
        set_num_threads(before)
    for a, b in zip(one, many):  # volume and all four gradients
        assert torch.equal(a, b)


# ------------------------------------------------------------ backends
def test_auto_backend_choice_and_log(caplog, monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    g = random_set(batch=1, k=3, dtype=torch.float32)
    expected = "numba" if numba_available() else "torch"
    assert resolve_backend(g, "auto") == expected
    with caplog.at_level(logging.INFO, logger="medgmae_core.render"):
        render_volume(g, (6, 6, 6))
    assert f"backend={expected}" in caplog.text
    assert resolve_backend(g, "reference") == "reference"
    assert resolve_backend(g, "torch") == "torch"


def test_torch_path_works_without_numba(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.setenv("MEDGMAE_DISABLE_NUMBA", "1")
    g = random_set(batch=1, k=4, dtype=torch.float64)
    assert resolve_backend(g, "auto") == "torch"
    with pytest.raises(RuntimeError, match="numba"):
        render_volume(g, (6, 6, 6), backend="numba")
    torch.testing.assert_close(render_volume(g, (9, 8, 7)), render_reference(g, (9, 8, 7)), rtol=0, atol=1e-10)


def test_backend_environment_override(monkeypatch):
    g = random_set(batch=1, k=3)
    monkeypatch.setenv(BACKEND_ENV, "reference")
    assert resolve_backend(g, "auto") == "reference"
    assert resolve_backend(g, "torch") == "torch"  # an explicit choice wins
    monkeypatch.setenv(BACKEND_ENV, "cuda-magic")
    with pytest.raises(ValueError, match=BACKEND_ENV):
        resolve_backend(g, "auto")


# ---------------------------------------------------------- bad inputs
@pytest.mark.parametrize("kwargs,match", [
    ({"shape": (8, 8)}, "shape"),
    ({"shape": (8, 1, 8)}, "shape"),
    ({"shape": "big"}, "shape"),
    ({"cutoff": -1.0}, "cutoff"),
    ({"cutoff": 0}, "cutoff"),
    ({"cutoff": "3"}, "cutoff"),
    ({"backend": "gpu"}, "backend"),
    ({"convention": "paperish"}, "convention"),
])
def test_bad_inputs_are_rejected_with_named_parameter(kwargs, match):
    g = random_set(batch=1, k=2)
    args = {"shape": (8, 8, 8), **kwargs}
    shape = args.pop("shape")
    with pytest.raises(ValueError, match=match):
        render_volume(g, shape, **args)


def test_non_gaussian_set_is_rejected():
    with pytest.raises(GaussianValidationError, match="GaussianSet"):
        render_volume(torch.zeros(1, 4, 11), (8, 8, 8))


@pytest.mark.parametrize("backend", FAST)
def test_signed_and_zero_intensities(backend):
    """Amplitudes of any sign (and zero) render and differentiate like the reference."""
    g = random_set(batch=1, k=6, seed=9)
    g = GaussianSet(g.centres, g.scales, g.quaternions, torch.tensor([[0.5, -0.7, 0.0, 1.1, -0.2, 0.3]],
                                                                     dtype=torch.float64))
    shape = (11, 12, 10)
    weight = torch.randn(1, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = _grads(g, shape, weight, "reference", "paper")
    out = _grads(g, shape, weight, backend, "paper")
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(render_volume(g, shape, backend=backend), render_reference(g, shape),
                               rtol=0, atol=1e-10)
