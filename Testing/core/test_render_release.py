"""convention="release" against a literal port of the public release's CUDA kernel rule (release_reference.py).

The release centres its voxel box at mu*N, half-width 2*s*N from the unrotated scales, truncates both ends
with C's (int) (toward zero), clamps to the volume and loops inclusively; the values use voxel i at i/(N-1),
c = 0.1 and the precision built from R^T. Every backend must reproduce the port to 1e-6 (float64), and the
previous rule (box centre mu*(N-1), ceil/floor) must not.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from medgmae_core.gaussians import GaussianSet, precision_from
from medgmae_core.numba_support import numba_available
from medgmae_core.render import render_reference, render_volume
from medgmae_core.render.geometry import release_boxes
from medgmae_core.render.release_reference import release_box, render_release_port_set

BACKENDS = ["reference", "torch",
            pytest.param("numba", marks=pytest.mark.skipif(not numba_available(), reason="numba missing"))]
SHAPES = [(24, 24, 24), (32, 32, 32), (33, 33, 33), (24, 32, 33)]


def release_set(seed: int, dtype=torch.float64, k: int = 60) -> GaussianSet:
    """Random rotations, elongated (sigma 0.01..0.25 per axis, up to 25:1), some centres past the volume edge."""
    g = GaussianSet.random(2, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64,
                           sigma_range=(0.01, 0.25))
    centres = g.centres.clone()
    centres[:, ::5] = centres[:, ::5] * 1.2 - 0.1  # every fifth Gaussian anywhere in [-0.1, 1.1]
    return GaussianSet(centres, g.scales, g.quaternions, g.intensities).to(dtype)


def single(centre, scales, quat=(1.0, 0.0, 0.0, 0.0), intensity=1.0) -> GaussianSet:
    t = lambda v: torch.tensor(v, dtype=torch.float64)[None, None]  # noqa: E731
    return GaussianSet(t(centre), t(scales), t(quat), torch.tensor([[intensity]], dtype=torch.float64))


def render(g: GaussianSet, shape, backend: str) -> torch.Tensor:
    if backend == "reference":
        return render_reference(g, shape, convention="release")
    return render_volume(g, shape, convention="release", backend=backend)


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def old_rule_render(g: GaussianSet, shape) -> np.ndarray:
    """The previous ``release`` rule, kept here only to show it is not the release's: box centre mu*(N-1),
    half-width 2*s*(N-1), ceil/floor -- i.e. |d_a| <= 2 s_a in normalised units. Same values otherwise."""
    axes = [torch.linspace(0, 1, n, dtype=torch.float64) for n in shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
    prec = precision_from(g.scales, g.quaternions * torch.tensor([1.0, -1.0, -1.0, -1.0], dtype=g.dtype))
    d = grid[None, None] - g.centres[:, :, None, :]
    w = torch.exp(-0.5 * torch.einsum("bkni,bkij,bknj->bkn", d, prec, d))
    w = w * (d.abs() <= 2 * g.scales[:, :, None, :]).all(-1)
    return (0.1 * torch.einsum("bk,bkn->bn", g.intensities, w)).reshape(g.batch_size, *shape).numpy()


# ------------------------------------------------------------------ the box rule itself, by hand
# (centre, scale, N) -> the kernel's inclusive (start, end), worked out by hand from its source:
# mean = mu*N, expand = 2*s*N, start = max(0, (int)(mean - expand)), end = min(N-1, (int)(mean + expand))
HAND_BOXES = [
    (0.5, 0.05, 32, (12, 19)),     # 16 -+ 3.2 -> trunc(12.8)=12, trunc(19.2)=19 (old rule: 15.5 -+ 3.1 -> 13..18)
    (0.3, 0.04, 24, (5, 9)),       # 7.2 -+ 1.92 -> trunc(5.28)=5, trunc(9.12)=9
    (0.99, 0.1, 24, (18, 23)),     # 23.76 -+ 4.8 -> 18, trunc(28.56)=28 clamped to N-1=23
    (0.02, 0.05, 33, (0, 3)),      # 0.66 -+ 3.3 -> trunc(-2.64)=-2 -> max(0, .)=0, trunc(3.96)=3
    (-0.02, 0.005, 32, (0, 0)),    # -0.64 -+ 0.32 -> end trunc(-0.32)=0 (toward zero, not floor=-1): voxel 0 drawn
    (-0.1, 0.01, 32, (0, -2)),     # -3.2 -+ 0.64 -> end trunc(-2.56)=-2 < start 0: empty
    (1.2, 0.01, 24, (28, 23)),     # 28.8 -+ 0.48 -> start 28 > end 23: empty
]


@pytest.mark.parametrize("mu,s,n,expected", HAND_BOXES)
def test_port_box_matches_hand_worked_kernel_rule(mu, s, n, expected):
    shape = (n, 8, 9)
    box = release_box([mu, 0.5, 0.5], [s, 0.1, 0.1], shape)
    assert box[0] == expected
    lo, hi = release_boxes(torch.tensor([mu, 0.5, 0.5]), torch.tensor([s, 0.1, 0.1]), shape)[0].tolist()
    if expected[0] <= expected[1]:
        assert (lo, hi) == expected
    else:
        assert lo > hi  # empty, as in the kernel's loop


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mu,s,n,expected", HAND_BOXES)
def test_rendered_support_is_the_hand_worked_box(backend, mu, s, n, expected):
    """An axis-aligned Gaussian draws exactly the voxels of its box along axis 0 (and none when it is empty)."""
    shape = (n, 8, 9)
    out = render(single([mu, 0.5, 0.5], [s, 0.1, 0.1]), shape, backend)[0]
    drawn = torch.nonzero(out.abs().sum(dim=(1, 2)) > 0).flatten().tolist()
    start, end = expected
    assert drawn == list(range(start, end + 1))


def test_box_is_computed_in_float32_like_the_kernel():
    """mu = 0.375 - 1e-10: mu*32 is 12 in float32 but 11.999999997 in float64; with s = 1e-9 the kernel's
    start is trunc(12 - 6.4e-8 rounded in float32) = 12, a float64 evaluation would give 11."""
    mu, s, shape = 0.375 - 1e-10, 1e-9, (32, 8, 8)
    assert int(mu * 32 - 2 * s * 32) == 11  # the float64 arithmetic would differ...
    assert release_box([mu, 0.5, 0.5], [s, 0.1, 0.1], shape)[0] == (12, 12)  # ...the kernel's float32 does not
    ours = release_boxes(torch.tensor([mu, 0.5, 0.5], dtype=torch.float64),
                         torch.tensor([s, 0.1, 0.1], dtype=torch.float64), shape)
    assert ours[0].tolist() == [12, 12]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_every_box_equals_the_port_box(shape, dtype):
    g = release_set(seed=11, dtype=dtype, k=200)
    ours = release_boxes(g.centres, g.scales, shape)
    c, s = g.centres.double().numpy(), g.scales.double().numpy()
    for b in range(g.batch_size):
        for i in range(g.num_gaussians):
            port = release_box(c[b, i], s[b, i], shape)
            for a in range(3):
                lo, hi = int(ours[b, i, a, 0]), int(ours[b, i, a, 1])
                if port[a][0] <= port[a][1]:
                    assert (lo, hi) == port[a], (b, i, a)
                else:
                    assert lo > hi, (b, i, a)


# ------------------------------------------------------------------ every backend against the port
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_backend_matches_port(backend, shape):
    g = release_set(seed=sum(shape))
    port = render_release_port_set(g, shape)
    out = render(g, shape, backend).numpy()
    assert out.shape == port.shape
    assert float(np.abs(port).max()) > 0.05  # not trivially empty
    assert rel_l2(out, port) <= 1e-6
    assert float(np.abs(out - port).max()) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_port_float32(backend):
    """float32 Gaussians: the same boxes (bit-identical integer ranges) and values to float32 round-off."""
    shape = (32, 32, 32)
    g = release_set(seed=5, dtype=torch.float32)
    port = render_release_port_set(g, shape)
    out = render(g, shape, backend).double().numpy()
    assert rel_l2(out, port) <= 1e-5
    assert float(np.abs(out - port).max()) <= 1e-5


def test_old_rule_is_not_the_release():
    """The previous rule (mu*(N-1), ceil/floor) misses the port by ~20% relative L2 on random Gaussians at 32^3."""
    shape = (32, 32, 32)
    g = GaussianSet.random(2, 100, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    port = render_release_port_set(g, shape)
    assert rel_l2(old_rule_render(g, shape), port) > 0.1
    assert rel_l2(render_reference(g, shape, convention="release").numpy(), port) <= 1e-6


# ------------------------------------------------------------------ gradients
@pytest.mark.parametrize("backend", ["torch", pytest.param("numba", marks=BACKENDS[2].marks)])
def test_fast_gradients_match_dense_reference(backend):
    g = release_set(seed=3, k=20)
    shape = (24, 24, 24)
    weight = torch.randn(2, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def grads(name):
        leaves = g.map(lambda t: t.clone().requires_grad_())
        (render(leaves, shape, name) * weight).sum().backward()
        return [t.grad for t in leaves.tensors()]

    for label, a, b in zip(("centres", "scales", "quaternions", "intensities"), grads(backend), grads("reference")):
        assert float(b.abs().max()) > 0, label
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9, msg=lambda m: f"{label}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_finite_differences_of_the_port(backend):
    """d/dtheta sum(w * render) equals central differences of the port (its box fixed, as in the release)."""
    shape = (10, 9, 11)
    g = GaussianSet.cat([single([0.45, 0.52, 0.48], [0.15, 0.09, 0.2], [0.9, 0.3, -0.2, 0.25], 0.8),
                         single([0.62, 0.4, 0.55], [0.08, 0.17, 0.12], [0.7, -0.1, 0.5, 0.4], 1.2)])
    weight = torch.randn(1, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    leaves = g.map(lambda t: t.clone().requires_grad_())
    (render(leaves, shape, backend) * weight).sum().backward()
    analytic = torch.cat([t.grad.reshape(-1) for t in leaves.tensors()])
    flat = torch.cat([t.reshape(-1) for t in g.tensors()])
    sizes = [t.numel() for t in g.tensors()]
    shapes = [t.shape for t in g.tensors()]

    def loss(vec):
        parts = [p.reshape(sh) for p, sh in zip(torch.split(vec, sizes), shapes)]
        return float((render_release_port_set(GaussianSet(*parts), shape) * weight.numpy()).sum())

    eps = 1e-6
    numeric = torch.tensor([(loss(flat + eps * e) - loss(flat - eps * e)) / (2 * eps)
                            for e in torch.eye(flat.numel(), dtype=torch.float64)], dtype=torch.float64)
    assert float(numeric.abs().max()) > 1e-3
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-7)
