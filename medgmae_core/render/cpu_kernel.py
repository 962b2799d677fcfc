"""Fast CPU renderer: Gaussian-centric Numba kernels (no compiler needed at the user's site).

Each Gaussian touches exactly the voxels inside its r-sigma ellipsoid. For every
x-slice of its extent the y-range comes from the 2x2 Schur complement of the
precision, and for every (x, y) line the z-range is the solution of a quadratic,
so no voxel outside the ellipsoid is evaluated.

* Forward: parallel over (batch, x-slice); each job owns its slice of the output
  and adds its Gaussians in index order, so the result is bit-identical for any
  thread count.
* Backward: parallel over Gaussians; each accumulates ten moments of
  grad*weight (sum g, sum g*d_a, sum g*d_a*d_b) with no atomics. The chain from
  the precision to scales and quaternions stays in torch autograd
  (``NumbaRender`` is an autograd.Function on centres, precision, amplitudes).
* exp: in float32 with a cut-off of r <= ``FAST_EXP_MAX_RADIUS`` the exponent
  lies in [-r^2/2, 0] and a degree-5 polynomial of exp(x/32), squared five
  times, is used (< 1e-6 relative; vectorises, unlike ``math.exp`` without
  SVML). Otherwise -- float64, larger cut-offs, ``cutoff=None`` and the release
  box, where the exponent is unbounded -- the exact ``math.exp``.
* Array indices are unsigned so Numba drops its negative-index wraparound
  checks, which would block vectorisation.
* Works in float32 and float64: constants come in as arrays of the input dtype,
  never as Python float literals (which would promote float32 maths to float64).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..numba_support import njit, numba_available, prange
from .geometry import axis_scale

FAST_EXP_MAX_RADIUS = 4.0
_FASTMATH = {"contract", "reassoc", "nsz", "arcp"}
LANES = 8  # block width of the vectorised inner loops (AVX2 float32)
MOMENTS = 10  # g, g*dx, g*dy, g*dz, g*dx*dx, g*dx*dy, g*dx*dz, g*dy*dy, g*dy*dz, g*dz*dz
_U = np.uint64
# int -> float in the kernel's dtype: float32 + int16 stays float32 (int64 would promote to
# float64), and it needs no load from an index table, which would block vectorisation.
_I16 = np.int16


# ------------------------------------------------------------------ shared maths
@njit(inline="always")
def _poly_exp32(y, c):
    """exp(32*y) for y in [-0.15, 0]: degree-5 Taylor of exp(y) raised to the 32nd power; c holds typed constants."""
    p = c[0] + y * (c[0] + y * (c[1] + y * (c[2] + y * (c[3] + y * c[4]))))
    p = p * p
    p = p * p
    p = p * p
    p = p * p
    return p * p


@njit(inline="always")
def _schur(pv, b, g, one):
    """Per-Gaussian constants of the line solve from the voxel-unit precision (00,01,02,11,12,22)."""
    p00 = pv[b, g, 0]
    p01 = pv[b, g, 1]
    p02 = pv[b, g, 2]
    p11 = pv[b, g, 3]
    p12 = pv[b, g, 4]
    p22 = pv[b, g, 5]
    inv_p22 = one / p22
    s00 = p00 - p02 * p02 * inv_p22  # marginal precision of (x, y)
    s01 = p01 - p02 * p12 * inv_p22
    s11 = p11 - p12 * p12 * inv_p22
    inv_s11 = one / s11
    sxx = s00 - s01 * s01 * inv_s11  # marginal precision of x = 1 / Sigma_xx
    return p02, p12, p22, inv_p22, s00, s01, s11, inv_s11, sxx


@njit
def _x_ranges(mv, pv, clip, r2, ellipsoid, consts):
    """``[B,k,2]`` inclusive x range of each Gaussian (lo > hi when empty)."""
    batch, k = mv.shape[0], mv.shape[1]
    out = np.empty((batch, k, 2), dtype=np.int64)
    for b in range(batch):
        for g in range(k):
            lo = clip[b, g, 0, 0]
            hi = clip[b, g, 0, 1]
            if ellipsoid:
                sxx = _schur(pv, b, g, consts[0])[8]
                half = math.sqrt(r2 / sxx)
                lo = max(lo, math.ceil(mv[b, g, 0] - half))
                hi = min(hi, math.floor(mv[b, g, 0] + half))
            out[b, g, 0] = lo
            out[b, g, 1] = hi
    return out


@njit
def _slice_lists(xr, depth):
    """CSR lists of Gaussians per (batch, x-slice), in Gaussian index order."""
    batch, k = xr.shape[0], xr.shape[1]
    offsets = np.zeros(batch * depth + 1, dtype=np.int64)
    for b in range(batch):
        for g in range(k):
            for x in range(xr[b, g, 0], xr[b, g, 1] + 1):
                offsets[b * depth + x + 1] += 1
    for i in range(batch * depth):
        offsets[i + 1] += offsets[i]
    fill = offsets[:-1].copy()
    order = np.empty(offsets[-1], dtype=np.int64)
    for b in range(batch):
        for g in range(k):
            for x in range(xr[b, g, 0], xr[b, g, 1] + 1):
                j = b * depth + x
                order[fill[j]] = g
                fill[j] += 1
    return order, offsets


@njit(inline="always")
def _y_range(sch, dx, my, clip, b, g, r2, ellipsoid):
    lo = clip[b, g, 1, 0]
    hi = clip[b, g, 1, 1]
    if ellipsoid:
        s01, inv_s11, sxx = sch[5], sch[7], sch[8]
        rem = r2 - sxx * dx * dx
        if rem < 0:
            return 1, 0
        half = math.sqrt(rem * inv_s11)
        centre = my - s01 * dx * inv_s11
        lo = max(lo, math.ceil(centre - half))
        hi = min(hi, math.floor(centre + half))
    return lo, hi


@njit(inline="always")
def _line(sch, dx, dy, mz, clip, b, g, r2, ellipsoid):
    """z range of one (x, y) line, the z of the line's peak and its minimum Mahalanobis^2."""
    p02, p12, inv_p22, s00, s01, s11 = sch[0], sch[1], sch[3], sch[4], sch[5], sch[6]
    qmin = dx * (s00 * dx + (s01 + s01) * dy) + s11 * dy * dy
    zc = mz - (p02 * dx + p12 * dy) * inv_p22
    lo = clip[b, g, 2, 0]
    hi = clip[b, g, 2, 1]
    if ellipsoid:
        rem = r2 - qmin
        if rem < 0:
            return 1, 0, zc, qmin
        half = math.sqrt(rem * inv_p22)
        lo = max(lo, math.ceil(zc - half))
        hi = min(hi, math.floor(zc + half))
    return lo, hi, zc, qmin


# ---------------------------------------------------------------------- kernels
@njit(parallel=True, fastmath=_FASTMATH)
def _forward_kernel(mv, pv, amp, clip, order, offsets, r2, ellipsoid, fast, consts, ramp, out, dims):
    """out (flat [B*D*H*W]) += sum_g amp_g * exp(-q/2) over each Gaussian's cut-off."""
    depth, height, width = dims[0], dims[1], dims[2]
    jobs = offsets.shape[0] - 1
    half = consts[6]
    m_half32 = consts[7]
    for job in prange(jobs):
        b = job // depth
        x = job - b * depth
        for t in range(offsets[job], offsets[job + 1]):
            g = order[t]
            sch = _schur(pv, b, g, consts[0])
            p22 = sch[2]
            a = amp[b, g]
            dx = _I16(x) - mv[b, g, 0]
            ylo, yhi = _y_range(sch, dx, mv[b, g, 1], clip, b, g, r2, ellipsoid)
            for y in range(ylo, yhi + 1):
                dy = _I16(y) - mv[b, g, 1]
                zlo, zhi, zc, qmin = _line(sch, dx, dy, mv[b, g, 2], clip, b, g, r2, ellipsoid)
                if zlo > zhi:
                    continue
                n = _U(zhi - zlo + 1)
                base = _U(((b * depth + x) * height + y) * width + zlo)
                u = _I16(zlo) - zc
                if fast:
                    c2 = m_half32 * p22
                    c0 = m_half32 * qmin
                    for j in range(n):
                        v = u + _I16(j)
                        out[base + j] += a * _poly_exp32(c2 * v * v + c0, consts)
                else:
                    c2 = half * p22
                    c0 = half * qmin
                    for j in range(n):
                        v = u + _I16(j)
                        out[base + j] += a * math.exp(-(c2 * v * v + c0))


@njit(parallel=True, fastmath=_FASTMATH)
def _backward_kernel(mv, pv, clip, xr, r2, ellipsoid, fast, consts, ramp, grad, dims, moments):
    """moments[b, g] = the ten sums of grad(v) * exp(-q(v)/2) * (1, d, d d^T) over the cut-off."""
    depth, height, width = dims[0], dims[1], dims[2]
    batch, k = mv.shape[0], mv.shape[1]
    half = consts[6]
    m_half32 = consts[7]
    zero = consts[5]
    for job in prange(batch * k):
        b = job // k
        g = job - b * k
        sch = _schur(pv, b, g, consts[0])
        p22 = sch[2]
        m = np.zeros(MOMENTS, dtype=np.float64)
        for x in range(xr[b, g, 0], xr[b, g, 1] + 1):
            dx = _I16(x) - mv[b, g, 0]
            ylo, yhi = _y_range(sch, dx, mv[b, g, 1], clip, b, g, r2, ellipsoid)
            for y in range(ylo, yhi + 1):
                dy = _I16(y) - mv[b, g, 1]
                zlo, zhi, zc, qmin = _line(sch, dx, dy, mv[b, g, 2], clip, b, g, r2, ellipsoid)
                if zlo > zhi:
                    continue
                n = _U(zhi - zlo + 1)
                base = _U(((b * depth + x) * height + y) * width + zlo)
                dz0 = _I16(zlo) - mv[b, g, 2]
                shift = mv[b, g, 2] - zc  # v = dz + shift is the offset from the line's peak
                l0 = zero
                l1 = zero
                l2 = zero
                if fast:
                    c2 = m_half32 * p22
                    c0 = m_half32 * qmin
                    for j in range(n):
                        dz = dz0 + _I16(j)
                        v = dz + shift
                        gw = grad[base + j] * _poly_exp32(c2 * v * v + c0, consts)
                        l0 += gw
                        l1 += gw * dz
                        l2 += gw * dz * dz
                else:
                    c2 = half * p22
                    c0 = half * qmin
                    for j in range(n):
                        dz = dz0 + _I16(j)
                        v = dz + shift
                        gw = grad[base + j] * math.exp(-(c2 * v * v + c0))
                        l0 += gw
                        l1 += gw * dz
                        l2 += gw * dz * dz
                fx = np.float64(dx)
                fy = np.float64(dy)
                f0 = np.float64(l0)
                f1 = np.float64(l1)
                m[0] += f0
                m[1] += fx * f0
                m[2] += fy * f0
                m[3] += f1
                m[4] += fx * fx * f0
                m[5] += fx * fy * f0
                m[6] += fx * f1
                m[7] += fy * fy * f0
                m[8] += fy * f1
                m[9] += np.float64(l2)
        for i in range(MOMENTS):
            moments[b, g, i] = m[i]


@njit(parallel=True)
def _count_kernel(mv, pv, clip, xr, r2, ellipsoid, consts, ramp, counts):
    """counts[b, g] = number of voxels inside Gaussian g's cut-off (the useful evaluations)."""
    batch, k = mv.shape[0], mv.shape[1]
    for job in prange(batch * k):
        b = job // k
        g = job - b * k
        sch = _schur(pv, b, g, consts[0])
        total = 0
        for x in range(xr[b, g, 0], xr[b, g, 1] + 1):
            dx = _I16(x) - mv[b, g, 0]
            ylo, yhi = _y_range(sch, dx, mv[b, g, 1], clip, b, g, r2, ellipsoid)
            for y in range(ylo, yhi + 1):
                zlo, zhi, zc, qmin = _line(sch, dx, _I16(y) - mv[b, g, 1], mv[b, g, 2], clip, b, g, r2, ellipsoid)
                if zhi >= zlo:
                    total += zhi - zlo + 1
        counts[b, g] = total


# --------------------------------------------------------------- torch binding
class _Problem:
    """Numpy views of one render call in voxel units, shared by forward and backward."""

    def __init__(self, centres: torch.Tensor, precisions: torch.Tensor, clip: torch.Tensor,
                 shape: tuple[int, int, int], radius: float) -> None:
        dtype = centres.dtype
        np_dtype = np.float32 if dtype == torch.float32 else np.float64
        scale = axis_scale(shape, centres)  # [3]
        with torch.no_grad():
            pv = precisions.detach()
            pv = 0.5 * (pv + pv.transpose(-1, -2)) / (scale[:, None] * scale[None, :])
            iu = (torch.tensor([0, 0, 0, 1, 1, 2]), torch.tensor([0, 1, 2, 1, 2, 2]))
            self.pv = np.ascontiguousarray(pv[..., iu[0], iu[1]].cpu().numpy().astype(np_dtype))  # [B,k,6]
            self.mv = np.ascontiguousarray((centres.detach() * scale).cpu().numpy().astype(np_dtype))  # [B,k,3]
        self.clip = np.ascontiguousarray(clip.cpu().numpy().astype(np.int64))  # [B,k,3,2]
        self.shape = shape
        self.dims = np.array(shape, dtype=np.int64)
        self.ellipsoid = math.isfinite(radius)
        self.fast = self.ellipsoid and radius <= FAST_EXP_MAX_RADIUS and np_dtype == np.float32
        self.r2 = np_dtype(radius * radius if self.ellipsoid else 0.0)
        self.np_dtype = np_dtype
        self.consts = np.array([1.0, 1 / 2, 1 / 6, 1 / 24, 1 / 120, 0.0, 0.5, -0.5 / 32], dtype=np_dtype)
        self.ramp = np.arange(max(shape) + LANES + 1, dtype=np_dtype)
        self.xr = _x_ranges(self.mv, self.pv, self.clip, self.r2, self.ellipsoid, self.consts)

    def forward(self, amps: torch.Tensor) -> np.ndarray:
        batch = self.mv.shape[0]
        amp = np.ascontiguousarray(amps.detach().cpu().numpy().astype(self.np_dtype))
        order, offsets = _slice_lists(self.xr, self.shape[0])
        out = np.zeros(batch * int(np.prod(self.shape)), dtype=self.np_dtype)
        _forward_kernel(self.mv, self.pv, amp, self.clip, order, offsets, self.r2, self.ellipsoid, self.fast,
                        self.consts, self.ramp, out, self.dims)
        return out.reshape(batch, *self.shape)

    def moments(self, grad: torch.Tensor) -> np.ndarray:
        g = np.ascontiguousarray(grad.detach().cpu().numpy().astype(self.np_dtype)).reshape(-1)
        moments = np.empty(self.mv.shape[:2] + (MOMENTS,), dtype=np.float64)
        _backward_kernel(self.mv, self.pv, self.clip, self.xr, self.r2, self.ellipsoid, self.fast, self.consts,
                         self.ramp, g, self.dims, moments)
        return moments

    def count(self) -> np.ndarray:
        counts = np.empty(self.mv.shape[:2], dtype=np.int64)
        _count_kernel(self.mv, self.pv, self.clip, self.xr, self.r2, self.ellipsoid, self.consts, self.ramp, counts)
        return counts


class NumbaRender(torch.autograd.Function):
    """Differentiable w.r.t. centres ``[B,k,3]``, precisions ``[B,k,3,3]`` (normalised units) and amplitudes ``[B,k]``."""

    @staticmethod
    def forward(ctx, centres, precisions, amps, clip, shape, radius):
        problem = _Problem(centres, precisions, clip, shape, radius)
        ctx.problem = problem
        ctx.save_for_backward(precisions, amps)
        return torch.from_numpy(problem.forward(amps)).to(centres.device)

    @staticmethod
    def backward(ctx, grad_out):
        precisions, amps = ctx.saved_tensors
        problem: _Problem = ctx.problem
        mom = torch.from_numpy(problem.moments(grad_out)).to(device=precisions.device, dtype=precisions.dtype)
        scale = axis_scale(problem.shape, precisions)  # [3]
        m0 = mom[..., 0]  # [B,k]
        m1 = mom[..., 1:4] / scale  # [B,k,3] sum g w d in normalised units
        iu = ([0, 0, 0, 1, 1, 2], [0, 1, 2, 1, 2, 2])
        m2 = mom.new_zeros(mom.shape[:2] + (3, 3))
        m2[..., iu[0], iu[1]] = mom[..., 4:]
        m2 = m2 + torch.triu(m2, diagonal=1).transpose(-1, -2)
        m2 = m2 / (scale[:, None] * scale[None, :])  # [B,k,3,3]
        grad_amps = m0
        sym = 0.5 * (precisions + precisions.transpose(-1, -2))
        grad_centres = amps[..., None] * (sym @ m1[..., None])[..., 0]
        grad_prec = -0.5 * amps[..., None, None] * m2
        return grad_centres, grad_prec, grad_amps, None, None, None


def render_numba(centres: torch.Tensor, precisions: torch.Tensor, amps: torch.Tensor, clip: torch.Tensor,
                 shape: tuple[int, int, int], radius: float) -> torch.Tensor:
    """``[B,D,H,W]``: sum of amps*exp(-d^T P d / 2) over voxels inside the radius-sigma ellipsoid
    (``radius=inf``: no ellipsoid test) and inside ``clip`` (``[B,k,3,2]`` inclusive voxel ranges)."""
    if not numba_available():
        raise RuntimeError("the numba backend needs numba, which is not importable here")
    if centres.device.type != "cpu":
        raise ValueError(f"the numba backend runs on CPU tensors only, got device {centres.device}")
    return NumbaRender.apply(centres, precisions, amps, clip, tuple(shape), float(radius))


def count_useful_pairs(centres: torch.Tensor, precisions: torch.Tensor, clip: torch.Tensor,
                       shape: tuple[int, int, int], radius: float) -> int:
    """Number of (Gaussian, voxel) pairs inside the cut-off, counted exactly by the same line solve."""
    return int(_Problem(centres, precisions, clip, tuple(shape), float(radius)).count().sum())
