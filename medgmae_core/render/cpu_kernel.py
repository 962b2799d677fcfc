"""Fast CPU renderer: Gaussian-centric Numba kernels (no compiler needed at the user's site).

Each Gaussian touches exactly the voxels inside its r-sigma ellipsoid. For every
x-slice of its extent the y-range comes from the 2x2 Schur complement of the
precision, and for every (x, y) line the z-range is the solution of a quadratic,
so no voxel outside the ellipsoid is evaluated. The line set-ups of one x-slice
(sqrt, ceil, floor) are computed together in one vectorised loop, and the exp
of a line is evaluated over its length rounded up to ``LANES`` into a small
buffer, so both loops run as full SIMD vectors even though lines are short
(about 18 voxels at the benchmark's sizes).

* Forward: parallel over (batch, x-slice); each job owns its slice of the output
  and adds its Gaussians in index order, so the result is bit-identical for any
  thread count.
* Backward: parallel over (batch, x-slice) like the forward, so each job reads
  one slice of the gradient while it is in cache; each (Gaussian, slice) entry
  gets ten partial moments of grad*weight (sum g, sum g*d_a, sum g*d_a*d_b),
  summed per Gaussian in slice order afterwards: no atomics, deterministic. The chain from
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
* Memory: the output (and in backward a padded copy of its gradient) plus
  O(k) per-Gaussian arrays and the per-slice Gaussian lists; nothing is
  allocated per (Gaussian, voxel) pair.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..numba_support import exp_constants, njit, numba_available, poly_exp32, prange
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
def _slice_setup(sch, dx, dy0, ny, mz, r2, clo, chi, ellipsoid, lo_buf, hi_buf, q_buf, zc_buf):
    """Vectorised z-range set-up of the ny lines y = y0 .. y0+ny-1 of one x-slice of a Gaussian:
    first/last z inside (as floats; last < first when the line misses), Mahalanobis^2 minimum and its z."""
    p02, p12, inv_p22, s00, s01, s11 = sch[0], sch[1], sch[3], sch[4], sch[5], sch[6]
    a0 = s00 * dx * dx
    a1 = (s01 + s01) * dx
    zc0 = mz - p02 * dx * inv_p22
    zc1 = p12 * inv_p22
    zero = r2 - r2
    one = inv_p22 / inv_p22
    for i in range(ny):
        dy = dy0 + _I16(i)
        qmin = a0 + dy * (a1 + s11 * dy)
        zc = zc0 - zc1 * dy
        q_buf[i] = qmin
        zc_buf[i] = zc
        if ellipsoid:
            rem = r2 - qmin
            half = np.sqrt(max(rem, zero) * inv_p22)
            lo = max(np.ceil(zc - half), clo)
            hi = min(np.floor(zc + half), chi)
            lo_buf[i] = lo
            hi_buf[i] = hi if rem >= zero else lo - one
        else:
            lo_buf[i] = clo
            hi_buf[i] = chi


# ---------------------------------------------------------------------- kernels
@njit(parallel=True, fastmath=_FASTMATH)
def _forward_kernel(mv, pv, amp, clip, order, offsets, r2, ellipsoid, fast, consts, out, dims):
    """out (flat [B*D*H*W]) += sum_g amp_g * exp(-q/2) over each Gaussian's cut-off."""
    depth, height, width = dims[0], dims[1], dims[2]
    jobs = offsets.shape[0] - 1
    half = consts[6]
    m_half32 = consts[7]
    k0 = consts[0]
    k1 = consts[1]
    k2 = consts[2]
    k3 = consts[3]
    k4 = consts[4]
    zero = consts[5]
    for job in prange(jobs):
        b = job // depth
        x = job - b * depth
        buf = np.empty(width + LANES, dtype=out.dtype)
        lo_buf = np.empty(height + LANES, dtype=out.dtype)
        hi_buf = np.empty(height + LANES, dtype=out.dtype)
        q_buf = np.empty(height + LANES, dtype=out.dtype)
        zc_buf = np.empty(height + LANES, dtype=out.dtype)
        for t in range(offsets[job], offsets[job + 1]):
            g = order[t]
            sch = _schur(pv, b, g, consts[0])
            p22 = sch[2]
            a = amp[b, g]
            my = mv[b, g, 1]
            mz = mv[b, g, 2]
            dx = _I16(x) - mv[b, g, 0]
            ylo, yhi = _y_range(sch, dx, my, clip, b, g, r2, ellipsoid)
            row = (b * depth + x) * height
            if ylo > yhi:
                continue
            _slice_setup(sch, dx, _I16(ylo) - my, yhi - ylo + 1, mz, r2, zero + _I16(clip[b, g, 2, 0]),
                         zero + _I16(clip[b, g, 2, 1]), ellipsoid, lo_buf, hi_buf, q_buf, zc_buf)
            for y in range(ylo, yhi + 1):
                i = y - ylo
                zlo = int(lo_buf[i])
                zhi = int(hi_buf[i])
                if zlo > zhi:
                    continue
                qmin = q_buf[i]
                zc = zc_buf[i]
                n = _U(zhi - zlo + 1)
                base = _U((row + y) * width + zlo)
                u = _I16(zlo) - zc
                if fast:
                    c2 = m_half32 * p22
                    c0 = m_half32 * qmin
                    npad = (n + _U(LANES - 1)) & ~_U(LANES - 1)
                    for j in range(npad):
                        v = u + _I16(j)
                        yv = c2 * v * v + c0
                        buf[j] = a * poly_exp32(yv, k0, k1, k2, k3, k4)
                    for j in range(n):
                        out[base + j] += buf[j]
                else:
                    c2 = half * p22
                    c0 = half * qmin
                    for j in range(n):
                        v = u + _I16(j)
                        out[base + j] += a * math.exp(-(c2 * v * v + c0))


@njit(parallel=True, fastmath=_FASTMATH)
def _backward_kernel(mv, pv, clip, order, offsets, r2, ellipsoid, fast, consts, grad, dims, partial):
    """partial[t] = the ten sums of grad(v) * exp(-q(v)/2) * (1, d, d d^T) over the cut-off, restricted
    to one x-slice, for entry t of the per-slice Gaussian lists (summed per Gaussian by ``_sum_partials``).
    Slice-major like the forward, so each job reads one slice of ``grad`` while it is in cache.
    ``grad`` has LANES entries of padding at its end."""
    depth, height, width = dims[0], dims[1], dims[2]
    jobs = offsets.shape[0] - 1
    half = consts[6]
    m_half32 = consts[7]
    zero = consts[5]
    k0 = consts[0]
    k1 = consts[1]
    k2 = consts[2]
    k3 = consts[3]
    k4 = consts[4]
    for job in prange(jobs):
        b = job // depth
        x = job - b * depth
        lo_buf = np.empty(height + LANES, dtype=grad.dtype)
        hi_buf = np.empty(height + LANES, dtype=grad.dtype)
        q_buf = np.empty(height + LANES, dtype=grad.dtype)
        zc_buf = np.empty(height + LANES, dtype=grad.dtype)
        row = (b * depth + x) * height
        for t in range(offsets[job], offsets[job + 1]):
            g = order[t]
            _backward_slice(mv, pv, clip, b, g, x, row, r2, ellipsoid, fast, consts, grad, width,
                            lo_buf, hi_buf, q_buf, zc_buf, partial, t)


@njit(inline="always", fastmath=_FASTMATH)
def _backward_slice(mv, pv, clip, b, g, x, row, r2, ellipsoid, fast, consts, grad, width,
                    lo_buf, hi_buf, q_buf, zc_buf, partial, t):
    """One Gaussian's ten partial moments over one x-slice."""
    half = consts[6]
    m_half32 = consts[7]
    zero = consts[5]
    k0 = consts[0]
    k1 = consts[1]
    k2 = consts[2]
    k3 = consts[3]
    k4 = consts[4]
    clo = zero + _I16(clip[b, g, 2, 0])
    chi = zero + _I16(clip[b, g, 2, 1])
    sch = _schur(pv, b, g, consts[0])
    p22 = sch[2]
    my = mv[b, g, 1]
    mz = mv[b, g, 2]
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = m8 = m9 = 0.0
    dx = _I16(x) - mv[b, g, 0]
    ylo, yhi = _y_range(sch, dx, my, clip, b, g, r2, ellipsoid)
    if ylo <= yhi:
        _slice_setup(sch, dx, _I16(ylo) - my, yhi - ylo + 1, mz, r2, clo, chi, ellipsoid,
                     lo_buf, hi_buf, q_buf, zc_buf)
        for y in range(ylo, yhi + 1):
            i = y - ylo
            zlo = int(lo_buf[i])
            zhi = int(hi_buf[i])
            if zlo > zhi:
                continue
            dy = _I16(y) - my
            qmin = q_buf[i]
            zc = zc_buf[i]
            n = _U(zhi - zlo + 1)
            base = _U((row + y) * width + zlo)
            dz0 = _I16(zlo) - mz
            shift = mz - zc  # v = dz + shift is the offset from the line's peak
            l0 = zero
            l1 = zero
            l2 = zero
            if fast:
                c2 = m_half32 * p22
                c0 = m_half32 * qmin
                npad = (n + _U(LANES - 1)) & ~_U(LANES - 1)
                for j in range(npad):
                    v = dz0 + shift + _I16(j)
                    yv = c2 * v * v + c0
                    w = poly_exp32(yv, k0, k1, k2, k3, k4)
                    if j >= n:
                        w = zero
                    dz = dz0 + _I16(j)
                    gw = grad[base + j] * w
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
            m0 += f0
            m1 += fx * f0
            m2 += fy * f0
            m3 += f1
            m4 += fx * fx * f0
            m5 += fx * fy * f0
            m6 += fx * f1
            m7 += fy * fy * f0
            m8 += fy * f1
            m9 += np.float64(l2)
    partial[t, 0] = m0
    partial[t, 1] = m1
    partial[t, 2] = m2
    partial[t, 3] = m3
    partial[t, 4] = m4
    partial[t, 5] = m5
    partial[t, 6] = m6
    partial[t, 7] = m7
    partial[t, 8] = m8
    partial[t, 9] = m9


@njit(parallel=True)
def _sum_partials(order, offsets, partial, depth, moments):
    """moments[b, g] = sum over slices of partial[t] (in slice order: deterministic)."""
    batch = moments.shape[0]
    for b in prange(batch):
        moments[b] = 0.0
        for job in range(b * depth, (b + 1) * depth):
            for t in range(offsets[job], offsets[job + 1]):
                g = order[t]
                for i in range(MOMENTS):
                    moments[b, g, i] += partial[t, i]


@njit(parallel=True, fastmath=_FASTMATH)
def _count_kernel(mv, pv, clip, xr, r2, ellipsoid, consts, dims, counts):
    """counts[b, g] = number of voxels inside Gaussian g's cut-off (the useful evaluations)."""
    batch, k = mv.shape[0], mv.shape[1]
    height = dims[1] + LANES
    zero = consts[5]
    for job in prange(batch * k):
        b = job // k
        g = job - b * k
        lo_buf = np.empty(height, dtype=mv.dtype)
        hi_buf = np.empty(height, dtype=mv.dtype)
        q_buf = np.empty(height, dtype=mv.dtype)
        zc_buf = np.empty(height, dtype=mv.dtype)
        sch = _schur(pv, b, g, consts[0])
        my = mv[b, g, 1]
        total = 0
        for x in range(xr[b, g, 0], xr[b, g, 1] + 1):
            dx = _I16(x) - mv[b, g, 0]
            ylo, yhi = _y_range(sch, dx, my, clip, b, g, r2, ellipsoid)
            if ylo > yhi:
                continue
            _slice_setup(sch, dx, _I16(ylo) - my, yhi - ylo + 1, mv[b, g, 2], r2, zero + _I16(clip[b, g, 2, 0]),
                         zero + _I16(clip[b, g, 2, 1]), ellipsoid, lo_buf, hi_buf, q_buf, zc_buf)
            for i in range(yhi - ylo + 1):
                total += max(0, int(hi_buf[i]) - int(lo_buf[i]) + 1)
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
        if max(shape) > np.iinfo(np.int16).max:
            raise ValueError(f"the numba backend supports volume sides up to 32767 voxels, got shape {shape}")
        self.shape = shape
        self.dims = np.array(shape, dtype=np.int64)
        self.ellipsoid = math.isfinite(radius)
        self.fast = self.ellipsoid and radius <= FAST_EXP_MAX_RADIUS and np_dtype == np.float32
        self.r2 = np_dtype(radius * radius if self.ellipsoid else 0.0)
        self.np_dtype = np_dtype
        self.consts = np.concatenate([exp_constants(np_dtype), np.array([0.0, 0.5, -0.5 / 32], dtype=np_dtype)])
        self.xr = _x_ranges(self.mv, self.pv, self.clip, self.r2, self.ellipsoid, self.consts)
        self.order, self.offsets = _slice_lists(self.xr, self.shape[0])

    def forward(self, amps: torch.Tensor) -> np.ndarray:
        batch = self.mv.shape[0]
        amp = np.ascontiguousarray(amps.detach().cpu().numpy(), dtype=self.np_dtype)
        out = np.zeros(batch * int(np.prod(self.shape)), dtype=self.np_dtype)
        _forward_kernel(self.mv, self.pv, amp, self.clip, self.order, self.offsets, self.r2, self.ellipsoid, self.fast,
                        self.consts, out, self.dims)
        return out.reshape(batch, *self.shape)

    def moments(self, grad: torch.Tensor) -> np.ndarray:
        flat = grad.detach().reshape(-1).cpu().numpy()
        g = np.zeros(flat.shape[0] + LANES, dtype=self.np_dtype)  # padded: vector loads may run past a line
        g[:flat.shape[0]] = flat
        partial = np.empty((self.order.shape[0], MOMENTS), dtype=self.np_dtype)  # per (Gaussian, slice)
        _backward_kernel(self.mv, self.pv, self.clip, self.order, self.offsets, self.r2, self.ellipsoid, self.fast,
                         self.consts, g, self.dims, partial)
        moments = np.empty(self.mv.shape[:2] + (MOMENTS,), dtype=np.float64)
        _sum_partials(self.order, self.offsets, partial, self.shape[0], moments)
        return moments

    def count(self) -> np.ndarray:
        counts = np.empty(self.mv.shape[:2], dtype=np.int64)
        _count_kernel(self.mv, self.pv, self.clip, self.xr, self.r2, self.ellipsoid, self.consts, self.dims, counts)
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
