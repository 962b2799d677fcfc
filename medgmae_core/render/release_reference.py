"""Slow, literal port of the public MedGMAE release's volume-rendering rule (forward only): the test reference
for ``render_volume(..., convention="release")``.

This is a port of the release's kernel rule, written from reading it, not copied: the code below re-expresses
the rule in plain numpy and shares nothing with the renderer it checks (its own rotation matrix, its own box,
its own voxel coordinates).

What the release does, read from github.com/windrise/MedGMAE at commit 692314f:

* ``utils/discretize_grid.cu``, ``compute_intensity_forward_kernel`` (one CUDA thread per Gaussian; the
  backward kernel ``compute_intensity_backward_kernel`` walks exactly the same box):

  - box centre, per axis a with N_a voxels: ``mean_a = mu_a * N_a`` in float32 -- times N, not (N - 1);
  - box half-width: ``expand_a = (2.0 * s_a) * N_a`` in float32, from the *unrotated* scale s_a;
  - box ends: ``start_a = max(0, (int)(mean_a - expand_a))`` and
    ``end_a = min(N_a - 1, (int)(mean_a + expand_a))``; the C cast ``(int)`` truncates toward zero (not
    floor: an end in (-1, 0) becomes 0, so voxel 0 is still drawn);
  - loops ``for (z = start; z <= end; ++z)`` over all three axes: both ends inclusive, empty when
    start > end; no other test (no ellipsoid, no cut-off on the exponent);
  - the point of voxel (z, x, y) is read from the grid tensor the caller passes in, the centre ``mu`` is the
    raw normalised centre, ``d = point - mu``;
  - exponent ``power = -0.5 * sum_ij d_i M_ij d_j`` with the full 3x3 matrix M (row-major, 9 floats);
  - value ``intensity * __expf(power)`` atomically added into ``grid[z, x, y]``; the volume starts at zero.
    Axis 0 of centres and scales goes with the volume's first axis (size ``intensity_grid.size(1)``).

* ``models/fix/networks/gaussian_renderer.py``:

  - ``create_grid_3d(c, h, w)``: ``torch.linspace(0, 1, steps=N)`` per axis, ``meshgrid`` 'ij' and stacked
    in axis order, so voxel i sits at i / (N - 1) (the box above is centred at mu * N: the two disagree,
    which is the release's behaviour and is reproduced here);
  - ``rendering2``: the kernel gets ``0.1 * density`` as its intensity (c = 0.1) and
    ``M = L @ L^T`` with ``L = build_scaling_rotation_inverse(scales, rotation)``; everything in float32.

* ``utils/general_utils.py``:

  - ``build_rotation(q)``: q = (w, x, y, z) divided by its norm, then the standard rotation matrix R(q);
  - ``build_scaling_rotation_inverse(s, q)``: ``L = R^T @ diag(1 / s)``, so ``M = R^T diag(1/s^2) R``. The
    precision of Sigma = R S^2 R^T would be ``R diag(1/s^2) R^T``: the release uses R^T, i.e. the rotation of
    the conjugated quaternion.

How this port evaluates it: the box is computed with the same float32 operations in the same order
(``mu * N``, ``(2 * s) * N``, a subtraction or addition, truncation toward zero); the Gaussian values are
computed in float64 with the exact ``exp`` and exact voxel coordinates i / (N - 1). So the port is the release's
rule, without its float32 rounding of values (linspace, the matrix, ``__expf``), which only moves values by
float32 round-off. One caveat on "the same float32 operations": nvcc may fuse ``mu * N - expand`` into an FMA,
which can move a box end by one only when mu * N +- 2 s N lies within a float32 ulp of an integer.
"""
from __future__ import annotations

import math

import numpy as np

RELEASE_AMPLITUDE = 0.1  # rendering2 passes 0.1 * density as the kernel's intensity
RELEASE_BOX_COEFF = 2.0  # "coeff" in the kernel: half-width 2 * s (in units of the volume side)


def release_rotation(q) -> np.ndarray:
    """R(q) for one quaternion (w, x, y, z), normalised first, float64 ``[3, 3]``."""
    q = np.asarray(q, dtype=np.float64)
    w, x, y, z = q / math.sqrt(float(q @ q))
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


def release_matrix(scales, q) -> np.ndarray:
    """The matrix in the release's exponent: ``(R^T diag(1/s)) (R^T diag(1/s))^T``, float64 ``[3, 3]``."""
    lower = release_rotation(q).T @ np.diag(1.0 / np.asarray(scales, dtype=np.float64))
    return lower @ lower.T


def release_box(centre, scales, shape) -> list[tuple[int, int]]:
    """Inclusive voxel index range ``[(start, end)] * 3`` the release's kernel loops over (start > end: empty).

    float32 as in the kernel: ``mean = mu * N``, ``expand = (2 * s) * N``, then ``(int)`` truncates toward zero.
    """
    box = []
    for a in range(3):
        n = np.float32(shape[a])
        mean = np.float32(centre[a]) * n
        expand = (np.float32(RELEASE_BOX_COEFF) * np.float32(scales[a])) * n
        start = max(0, int(mean - expand))  # int() of a float truncates toward zero, like C's (int)
        end = min(int(shape[a]) - 1, int(mean + expand))
        box.append((start, end))
    return box


def render_release_port(centres, scales, quaternions, intensities, shape) -> np.ndarray:
    """``[B, D, H, W]`` float64 volume the release's rule gives for Gaussians in normalised [0, 1]^3 coordinates.

    centres ``[B, k, 3]``, scales ``[B, k, 3]``, quaternions ``[B, k, 4]`` (w, x, y, z, as passed to the release:
    *not* conjugated here, the release's R^T does that), intensities ``[B, k]`` (before the factor 0.1).
    One Gaussian at a time, vectorised over its box only; slow, for tests.
    """
    centres = np.asarray(centres, dtype=np.float64)
    scales = np.asarray(scales, dtype=np.float64)
    quaternions = np.asarray(quaternions, dtype=np.float64)
    intensities = np.asarray(intensities, dtype=np.float64)
    shape = tuple(int(n) for n in shape)
    batch, k = centres.shape[:2]
    out = np.zeros((batch, *shape), dtype=np.float64)
    for b in range(batch):
        for g in range(k):
            mu = centres[b, g]
            box = release_box(mu, scales[b, g], shape)
            if any(start > end for start, end in box):
                continue
            m = release_matrix(scales[b, g], quaternions[b, g])
            # voxel i of an axis of N sits at i / (N - 1) (create_grid_3d's linspace(0, 1, N))
            pts = [np.arange(start, end + 1, dtype=np.float64) / (n - 1) for (start, end), n in zip(box, shape)]
            d = np.stack(np.meshgrid(*pts, indexing="ij"), axis=-1) - mu  # [nz, nx, ny, 3]
            power = -0.5 * np.einsum("...i,ij,...j->...", d, m, d)
            value = RELEASE_AMPLITUDE * intensities[b, g] * np.exp(power)
            (z0, z1), (x0, x1), (y0, y1) = box
            out[b, z0:z1 + 1, x0:x1 + 1, y0:y1 + 1] += value
    return out


def render_release_port_set(gaussians, shape) -> np.ndarray:
    """``render_release_port`` for a ``GaussianSet`` (any dtype or device; values are read as float64)."""
    t = [x.detach().cpu().double().numpy() for x in gaussians.tensors()]
    return render_release_port(*t, shape)
