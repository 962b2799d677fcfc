"""Analytic X-ray projection of 3D Gaussians (the R2-Gaussian splat).

The line integral of ``I exp(-1/2 d^T Sigma^-1 d)`` along a ray is a 2D
Gaussian on the detector, ``A exp(-1/2 e^T Sigma2^-1 e)``, with
``Sigma2 = J Sigma J^T`` and ``A = I sqrt(2 pi det(Sigma) det(J J^T) / det(Sigma2))``,
where ``J`` (2x3) maps a displacement at the Gaussian centre to detector mm:
the fixed projection ``(e_u, e_v)`` for parallel beam (exact), the perspective
Jacobian at the centre for cone beam (local-affine approximation).
Everything is in mm, so the result is the line integral (mm) of
``render_volume(..., convention="paper")``'s intensity: ``project_gaussians(g, geom)``
~= ``project_volume(render_volume(g, shape), geom)``.

Stage 1 (torch, differentiable, shared by every backend): per (Gaussian, view)
six splat parameters in detector pixel units, ``[B, C, k, 6]`` =
(col, row, p_cc, p_cr, p_rr, amplitude), ``p`` the 2x2 precision.
Stage 2 (backends) splats them where the 2D Mahalanobis distance <= ``cutoff``:

* ``reference``: dense over all pixels, chunked; slow and obviously right.
  Its backward is plain autograd, in chunks over k.
* ``numba`` (CPU): Gaussian-centric; each detector row of the ellipse is solved
  analytically and exp is a recurrence along the row (float64 inputs use exact
  ``math.exp`` anchors, float32 the fast polynomial). The backward accumulates
  six moments per (Gaussian, view), each owned by one thread (no atomics).
* ``torch``: Gaussian-centric patches bucketed by footprint size, one GEMM per
  bucket, added with ``index_add``; its backward gathers the same six moments
  with a second GEMM. Device-agnostic (the CUDA path).

Views are processed in chunks; the backward pass recomputes stage 1 per chunk
and calls the backend's vector-Jacobian product, so memory stays bounded at any k.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch

from .. import backends
from ..backends import BACKENDS
from ..gaussians import GaussianSet, GaussianValidationError
from ..numba_support import fast_exp, get_num_threads, njit, prange
from .geometry import ConeBeam, check_geometry

log = logging.getLogger(__name__)

SPLAT_PARAMS = 6  # col, row, p_cc, p_cr, p_rr, amplitude
DEFAULT_CHUNK_MB = 256.0
_BYTES_PER_PAIR = 4 * 64  # rough autograd footprint of stage 1 per (Gaussian, view) in float32


# ----------------------------------------------------------------- stage 1
COV_ENTRIES = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))


def gaussians_mm(gaussians: GaussianSet, geometry) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Component-major, contiguous: centres ``[B, 3, k]`` (mm), the six covariance entries
    ``[B, 6, k]`` (S00, S11, S22, S01, S02, S12; mm^2) and ``det Sigma`` ``[B, k]``."""
    extent = geometry.extent_tensor(gaussians.dtype, gaussians.device)  # [3]
    means = ((gaussians.centres - 0.5) * extent).transpose(1, 2).contiguous()
    cov = gaussians.covariances() * (extent[:, None] * extent[None, :])  # [B, k, 3, 3]
    cov6 = torch.stack([cov[..., i, j] for i, j in COV_ENTRIES], dim=1)  # [B, 6, k]
    det3 = (gaussians.scales * extent).prod(-1).square()
    return means, cov6, det3


Vec3 = tuple  # three tensors (or floats) broadcasting to [B, C, k]


def _is_zero(a) -> bool:
    return isinstance(a, float) and a == 0.0


def _quad(x: Vec3, y: Vec3, cov: tuple) -> torch.Tensor:
    """``x^T Sigma y`` elementwise; ``cov`` = (S00, S11, S22, S01, S02, S12). Components given as the float 0.0
    (the Jacobian's structural zeros) are skipped: the same sum with fewer tensor ops."""
    s00, s11, s22, s01, s02, s12 = cov
    terms = []
    for (a, b), s in (((0, 0), s00), ((1, 1), s11), ((2, 2), s22)):
        if not (_is_zero(x[a]) or _is_zero(y[b])):
            terms.append(x[a] * y[b] * s)
    for (a, b), s in (((0, 1), s01), ((0, 2), s02), ((1, 2), s12)):
        pair = [x[i] * y[j] for i, j in ((a, b), (b, a)) if not (_is_zero(x[i]) or _is_zero(y[j]))]
        if pair:
            terms.append((pair[0] + pair[1] if len(pair) == 2 else pair[0]) * s)
    out = terms[0]
    for t in terms[1:]:
        out = out + t
    return out


def detector_jacobian(means: torch.Tensor, geometry, views: slice) -> tuple[torch.Tensor, torch.Tensor, Vec3, Vec3]:
    """Detector (u, v) mm ``[B, C, k]`` of centres ``[B, 3, k]`` and the rows ``J_u, J_v`` of their 2x3 Jacobian.

    Elementwise on ``[B, C, k]`` (batched tiny matmuls are far slower on CPU).
    """
    angles = geometry.angles[views].to(device=means.device, dtype=torch.float64)
    cs = torch.cos(angles).to(means.dtype)[None, :, None]  # [1, C, 1]
    sn = torch.sin(angles).to(means.dtype)[None, :, None]
    m0, m1, m2 = (means[:, a, None, :] for a in range(3))  # [B, 1, k]
    u = -sn * m0 + cs * m1  # [B, C, k] position along e_u
    v = m2.expand_as(u)
    if not isinstance(geometry, ConeBeam):
        return u, v, (-sn, cs, 0.0), (0.0, 0.0, 1.0)
    sdd = geometry.source_to_detector
    depth = (cs * m0 + sn * m1 + geometry.source_to_origin).clamp_min(1e-3 * geometry.source_to_origin)
    scale = sdd / depth
    u, v = u * scale, v * scale  # perspective detector coordinates
    alpha, beta = u / sdd, v / sdd
    j_u = (scale * (-sn - alpha * cs), scale * (cs - alpha * sn), 0.0)  # d u / d x
    j_v = (-scale * beta * cs, -scale * beta * sn, scale)  # d v / d x
    return u, v, j_u, j_v


def splat_params(means: torch.Tensor, cov6: torch.Tensor, det3: torch.Tensor, intensities: torch.Tensor,
                 geometry, views: slice) -> torch.Tensor:
    """Per (Gaussian, view) 2D splat parameters in pixel units -> ``[B, C, k, 6]`` (inputs from ``gaussians_mm``)."""
    u, v, j_u, j_v = detector_jacobian(means, geometry, views)  # [B, C, k], rows of J
    six = tuple(cov6[:, e, None, :] for e in range(6))  # [B, 1, k] each
    dv, du = geometry.detector_spacing
    s_cc = _quad(j_u, j_u, six) / du**2  # projected covariance, pixel units
    s_cr = _quad(j_u, j_v, six) / (du * dv)
    s_rr = _quad(j_v, j_v, six) / dv**2
    det_px = s_cc * s_rr - s_cr * s_cr  # [B, C, k]
    if isinstance(geometry, ConeBeam):
        uu = j_u[0] ** 2 + j_u[1] ** 2
        vv = j_v[0] ** 2 + j_v[1] ** 2 + j_v[2] ** 2
        uv = j_u[0] * j_v[0] + j_u[1] * j_v[1]
        det_jj = uu * vv - uv * uv  # det(J J^T)
    else:
        det_jj = 1.0
    amplitude = intensities[:, None] * torch.sqrt(2 * math.pi * det3[:, None] * det_jj / (det_px * (du * dv) ** 2))
    col = u / du + geometry.axis_column
    row = v / dv + geometry.centre_row
    return torch.stack([col, row, s_rr / det_px, -s_cr / det_px, s_cc / det_px, amplitude], -1)


def splat_extents(params: torch.Tensor, cutoff: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Half-widths (rows, cols) in pixels of each splat's cutoff ellipse."""
    p_cc, p_cr, p_rr = params[..., 2], params[..., 3], params[..., 4]
    det = p_cc * p_rr - p_cr * p_cr
    return cutoff * torch.sqrt(p_cc / det), cutoff * torch.sqrt(p_rr / det)


def splat_exponent(params: torch.Tensor, d_col: torch.Tensor, d_row: torch.Tensor) -> torch.Tensor:
    """Squared 2D Mahalanobis distance; ``params [..., 6]`` broadcast against offsets."""
    return params[..., 2] * d_col * d_col + 2 * params[..., 3] * d_col * d_row + params[..., 4] * d_row * d_row


# ------------------------------------------------------- stage 2: reference
def splat_reference(params: torch.Tensor, rows: int, cols: int, cutoff: float,
                    max_pairs: int = 1 << 23) -> torch.Tensor:
    """Dense splat: ``params [B, C, k, 6]`` -> ``[B, C, rows, cols]``."""
    batch, views, k, _ = params.shape
    r_idx = torch.arange(rows, dtype=params.dtype, device=params.device)[:, None]  # [rows, 1]
    c_idx = torch.arange(cols, dtype=params.dtype, device=params.device)[None, :]  # [1, cols]
    out = params.new_zeros(batch, views, rows, cols)
    chunk = max(1, max_pairs // max(1, batch * views * rows * cols))
    for start in range(0, k, chunk):
        p = params[:, :, start:start + chunk, None, None, :]  # [B, C, kc, 1, 1, 6]
        maha = splat_exponent(p, c_idx - p[..., 0], r_idx - p[..., 1])  # [B, C, kc, rows, cols]
        val = p[..., 5] * torch.exp(-0.5 * maha) * (maha <= cutoff * cutoff)
        out = out + val.sum(2)
    return out


# ----------------------------------------------------------- stage 2: torch
_PATCH_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)


def _bucket(size: torch.Tensor, limit: int) -> torch.Tensor:
    """Round patch sizes up to the next entry of ``_PATCH_SIZES`` (capped at ``limit``)."""
    table = torch.tensor(_PATCH_SIZES + (1 << 30,), device=size.device)
    return table[torch.searchsorted(table, size)].clamp_max(limit)


def _patch_origin(centre: torch.Tensor, half: torch.Tensor, size: torch.Tensor, limit: int) -> torch.Tensor:
    """First row/col of a patch covering the in-detector footprint."""
    start = torch.ceil(centre - half).clamp_min(0)
    return torch.minimum(start, (limit - size).to(start.dtype)).long()


def _patch_batches(params: torch.Tensor, rows: int, cols: int, cutoff: float, max_pairs: int):
    """Yield ``(idx, image, row0, col0, sr, sc)``: batches of splats (flat indices into ``[N*k]``)
    sharing one ``sr x sc`` patch size, at most ~``max_pairs`` pixels per batch."""
    batch, views, k, _ = params.shape
    with torch.no_grad():
        flat = params.detach().reshape(-1, SPLAT_PARAMS)  # [N*k, 6]
        image = torch.arange(batch * views, device=params.device).repeat_interleave(k)  # [N*k]
        half_r, half_c = splat_extents(flat, cutoff)
        size_r = _bucket(torch.floor(2 * half_r).long() + 1, rows)
        size_c = _bucket(torch.floor(2 * half_c).long() + 1, cols)
        visible = ((flat[:, 1] + half_r >= 0) & (flat[:, 1] - half_r <= rows - 1)
                   & (flat[:, 0] + half_c >= 0) & (flat[:, 0] - half_c <= cols - 1) & torch.isfinite(half_r + half_c))
        row0 = _patch_origin(flat[:, 1], half_r, size_r, rows)
        col0 = _patch_origin(flat[:, 0], half_c, size_c, cols)
        key = size_r * 4096 + size_c
    for bucket in torch.unique(key[visible]).tolist():
        members = (visible & (key == bucket)).nonzero().squeeze(1)
        sr, sc = bucket // 4096, bucket % 4096
        step = max(1, max_pairs // (sr * sc))
        for start in range(0, members.numel(), step):
            idx = members[start:start + step]
            yield idx, image[idx], row0[idx], col0[idx], sr, sc


def _patch_exponent(p: torch.Tensor, row0: torch.Tensor, col0: torch.Tensor, sr: int, sc: int):
    """``-maha/2`` ``[n, P]`` over ``n`` patches of ``P = sr*sc`` pixels, the monomials ``[6, P]`` of
    (1, i, j, i^2, ij, j^2) in centred patch coordinates, and the centres ``f_r, f_c`` ``[n]`` there.

    The Mahalanobis distance is a quadratic in those coordinates, so a whole bucket is one GEMM.
    """
    ii, jj = torch.meshgrid(torch.arange(sr, device=p.device), torch.arange(sc, device=p.device), indexing="ij")
    i = (ii.reshape(-1) - (sr - 1) / 2).to(p.dtype)  # [P]
    j = (jj.reshape(-1) - (sc - 1) / 2).to(p.dtype)
    monomials = torch.stack([torch.ones_like(i), i, j, i * i, i * j, j * j])  # [6, P]
    f_r = p[:, 1] - row0.to(p.dtype) - (sr - 1) / 2  # [n]
    f_c = p[:, 0] - col0.to(p.dtype) - (sc - 1) / 2
    p_cc, p_cr, p_rr = p[:, 2], p[:, 3], p[:, 4]
    coeffs = torch.stack([p_cc * f_c * f_c + 2 * p_cr * f_r * f_c + p_rr * f_r * f_r,
                          -2 * (p_cr * f_c + p_rr * f_r), -2 * (p_cc * f_c + p_cr * f_r),
                          p_rr, 2 * p_cr, p_cc], dim=1)  # [n, 6]
    return (-0.5 * coeffs) @ monomials, monomials, f_r, f_c


def _patch_index(image, row0, col0, sr: int, sc: int, rows: int, cols: int) -> torch.Tensor:
    """Flat output index ``[n, P]`` of every patch pixel."""
    offsets = (torch.arange(sr, device=row0.device)[:, None] * cols + torch.arange(sc, device=row0.device)).reshape(-1)
    return ((image * rows + row0) * cols + col0)[:, None] + offsets


def _gauss(exponent: torch.Tensor, cutoff: float) -> torch.Tensor:
    zero = torch.zeros((), dtype=exponent.dtype, device=exponent.device)
    return torch.where(exponent >= -0.5 * cutoff * cutoff, torch.exp(exponent), zero)


def splat_torch(params: torch.Tensor, rows: int, cols: int, cutoff: float, max_pairs: int = 1 << 22) -> torch.Tensor:
    """Gaussian-centric patches, bucketed by size: ``[B, C, k, 6]`` -> ``[B, C, rows, cols]``.

    Differentiable by autograd; ``project_gaussians`` uses ``splat_torch_vjp`` instead.
    """
    flat = params.reshape(-1, SPLAT_PARAMS)
    out = params.new_zeros(params.shape[0] * params.shape[1] * rows * cols)
    for idx, image, row0, col0, sr, sc in _patch_batches(params, rows, cols, cutoff, max_pairs):
        p = flat[idx]
        exponent = _patch_exponent(p, row0, col0, sr, sc)[0]
        values = _gauss(exponent, cutoff) * p[:, 5:6]  # [n, P]
        out = out.index_add(0, _patch_index(image, row0, col0, sr, sc, rows, cols).reshape(-1), values.reshape(-1))
    return out.reshape(params.shape[0], params.shape[1], rows, cols)


def splat_torch_vjp(params: torch.Tensor, grad: torch.Tensor, cutoff: float, max_pairs: int = 1 << 22) -> torch.Tensor:
    """d(sum(grad * splat(params))) / d params ``[B, C, k, 6]`` from per-splat moments (two GEMMs per bucket)."""
    rows, cols = grad.shape[-2:]
    flat = params.detach().reshape(-1, SPLAT_PARAMS)
    grad_flat = grad.detach().to(params.dtype).reshape(-1)
    out = torch.zeros_like(flat)
    for idx, image, row0, col0, sr, sc in _patch_batches(params, rows, cols, cutoff, max_pairs):
        p = flat[idx]
        exponent, monomials, f_r, f_c = _patch_exponent(p, row0, col0, sr, sc)
        weights = _gauss(exponent, cutoff) * grad_flat[_patch_index(image, row0, col0, sr, sc, rows, cols)]  # [n, P]
        s1, s_i, s_j, s_ii, s_ij, s_jj = (weights @ monomials.T).unbind(1)  # sums of w * (1, i, j, i^2, ij, j^2)
        m_u, m_v = s_j - f_c * s1, s_i - f_r * s1  # moments of du = j - f_c, dv = i - f_r
        m_uu = s_jj - 2 * f_c * s_j + f_c * f_c * s1
        m_uv = s_ij - f_c * s_i - f_r * s_j + f_r * f_c * s1
        m_vv = s_ii - 2 * f_r * s_i + f_r * f_r * s1
        amp, p_cc, p_cr, p_rr = p[:, 5], p[:, 2], p[:, 3], p[:, 4]
        out[idx] = torch.stack([amp * (p_cc * m_u + p_cr * m_v), amp * (p_cr * m_u + p_rr * m_v), -0.5 * amp * m_uu,
                                -amp * m_uv, -0.5 * amp * m_vv, s1], dim=1)
    return out.reshape(params.shape)


# ----------------------------------------------------------- stage 2: numba
@njit(inline="always")
def _exp_anchor(x, precise):
    """exp for either sign: ``math.exp`` if ``precise`` (float64 input), else the fast polynomial."""
    if precise:
        return math.exp(x)
    if x <= 0.0:
        return fast_exp(x)
    return 1.0 / fast_exp(-x)


@njit(inline="always")
def _row_span(mc, dv, p_cc, p_cr, p_rr, r2, cols):
    """Columns ``[j_lo, j_hi]`` of one detector row inside the cutoff ellipse (clipped)."""
    b = p_cr * dv
    disc = b * b - p_cc * (p_rr * dv * dv - r2)
    if disc < 0.0:
        return 0, -1
    sq = math.sqrt(disc)
    lo = mc + (-b - sq) / p_cc
    hi = mc + (-b + sq) / p_cc
    if hi < 0.0 or lo > cols - 1.0:
        return 0, -1
    return max(0, int(math.ceil(lo))), min(cols - 1, int(math.floor(hi)))


@njit(inline="always")
def _row_range(mr, p_cc, p_cr, p_rr, cutoff, rows):
    det = p_cc * p_rr - p_cr * p_cr
    if not (det > 0.0 and p_cc > 0.0):
        return 0, -1
    half = cutoff * math.sqrt(p_cc / det)
    lo = mr - half
    hi = mr + half
    if hi < 0.0 or lo > rows - 1.0:
        return 0, -1
    return max(0, int(math.ceil(lo))), min(rows - 1, int(math.floor(hi)))


@njit(parallel=True, fastmath=True)
def _splat_forward_kernel(params, cutoff, precise, n_threads, partial_out):
    """params [N, K, 6]; partial_out [T, N, rows, cols] (zeros): thread t splats its own contiguous share of the K."""
    n_img, k = params.shape[0], params.shape[1]
    rows, cols = partial_out.shape[2], partial_out.shape[3]
    r2 = cutoff * cutoff
    for t in prange(n_threads):
        g_lo = (k * t) // n_threads
        g_hi = (k * (t + 1)) // n_threads
        for n in range(n_img):
            img = partial_out[t, n]
            for g in range(g_lo, g_hi):
                mc, mr = params[n, g, 0], params[n, g, 1]
                p_cc, p_cr, p_rr, amp = params[n, g, 2], params[n, g, 3], params[n, g, 4], params[n, g, 5]
                if amp == 0.0:
                    continue
                i_lo, i_hi = _row_range(mr, p_cc, p_cr, p_rr, cutoff, rows)
                q = math.exp(-p_cc)
                for i in range(i_lo, i_hi + 1):
                    dv = i - mr
                    j_lo, j_hi = _row_span(mc, dv, p_cc, p_cr, p_rr, r2, cols)
                    row = img[i]
                    du = j_lo - mc
                    val = amp * _exp_anchor(-0.5 * ((p_cc * du + 2.0 * p_cr * dv) * du + p_rr * dv * dv), precise)
                    ratio = _exp_anchor(-0.5 * (p_cc * (2.0 * du + 1.0) + 2.0 * p_cr * dv), precise)
                    for j in range(j_lo, j_hi + 1):
                        row[j] += val
                        val *= ratio
                        ratio *= q


@njit(parallel=True, fastmath=True)
def _splat_backward_kernel(params, cutoff, precise, grad_out, grad_params):
    """grad_out [N, rows, cols] -> grad_params [N, K, 6]; one thread owns each (image, Gaussian)."""
    n_img, k = params.shape[0], params.shape[1]
    rows, cols = grad_out.shape[1], grad_out.shape[2]
    r2 = cutoff * cutoff
    for idx in prange(n_img * k):
        n = idx // k
        g = idx - n * k
        mc, mr = params[n, g, 0], params[n, g, 1]
        p_cc, p_cr, p_rr, amp = params[n, g, 2], params[n, g, 3], params[n, g, 4], params[n, g, 5]
        i_lo, i_hi = _row_range(mr, p_cc, p_cr, p_rr, cutoff, rows)
        q = math.exp(-p_cc)
        m0 = 0.0
        m_u = 0.0
        m_v = 0.0
        m_uu = 0.0
        m_uv = 0.0
        m_vv = 0.0
        for i in range(i_lo, i_hi + 1):
            dv = i - mr
            j_lo, j_hi = _row_span(mc, dv, p_cc, p_cr, p_rr, r2, cols)
            du0 = j_lo - mc
            e = _exp_anchor(-0.5 * ((p_cc * du0 + 2.0 * p_cr * dv) * du0 + p_rr * dv * dv), precise)
            ratio = _exp_anchor(-0.5 * (p_cc * (2.0 * du0 + 1.0) + 2.0 * p_cr * dv), precise)
            g_row = grad_out[n, i]
            s0 = 0.0
            s1 = 0.0
            s2 = 0.0
            step = 0.0
            for j in range(j_lo, j_hi + 1):
                w = g_row[j] * e
                s0 += w
                s1 += w * step
                s2 += w * step * step
                e *= ratio
                ratio *= q
                step += 1.0
            s_u = s1 + du0 * s0  # sum of w * du
            s_uu = s2 + 2.0 * du0 * s1 + du0 * du0 * s0
            m0 += s0
            m_u += s_u
            m_v += dv * s0
            m_uu += s_uu
            m_uv += dv * s_u
            m_vv += dv * dv * s0
        grad_params[n, g, 0] = amp * (p_cc * m_u + p_cr * m_v)
        grad_params[n, g, 1] = amp * (p_cr * m_u + p_rr * m_v)
        grad_params[n, g, 2] = -0.5 * amp * m_uu
        grad_params[n, g, 3] = -amp * m_uv
        grad_params[n, g, 4] = -0.5 * amp * m_vv
        grad_params[n, g, 5] = m0


@njit(inline="always")
def _stage1_point(m0, m1, m2, cs, sn, cone, sod, sdd, dmin):
    """Detector (u, v), the Jacobian rows j_u, j_v and the pieces their gradient needs (t = 1/depth)."""
    u0 = -sn * m0 + cs * m1
    if not cone:
        return u0, m2, -sn, cs, 0.0, 0.0, 0.0, 1.0, u0, 0.0, False
    depth = cs * m0 + sn * m1 + sod
    clamped = depth < dmin
    if clamped:
        depth = dmin
    t = 1.0 / depth
    ju0 = sdd * t * (-sn) - sdd * u0 * t * t * cs
    ju1 = sdd * t * cs - sdd * u0 * t * t * sn
    jv0 = -sdd * m2 * t * t * cs
    jv1 = -sdd * m2 * t * t * sn
    jv2 = sdd * t
    return sdd * u0 * t, sdd * m2 * t, ju0, ju1, 0.0, jv0, jv1, jv2, u0, t, clamped


@njit(inline="always")
def _sym_mul(s00, s11, s22, s01, s02, s12, x0, x1, x2):
    return (s00 * x0 + s01 * x1 + s02 * x2, s01 * x0 + s11 * x1 + s12 * x2, s02 * x0 + s12 * x1 + s22 * x2)


@njit(parallel=True, fastmath=False)
def _stage1_forward_kernel(means, cov6, det3, inten, cosv, sinv, cone, sod, sdd, dmin, dv, du, col0, row0, out):
    """means [B, 3, k], cov6 [B, 6, k], det3/inten [B, k], cos/sin [C] -> out [B, C, k, 6] (as ``splat_params``)."""
    n_b, k = means.shape[0], means.shape[2]
    n_c = cosv.shape[0]
    two_pi = 2.0 * math.pi
    for idx in prange(n_b * k):
        b = idx // k
        g = idx - b * k
        m0, m1, m2 = float(means[b, 0, g]), float(means[b, 1, g]), float(means[b, 2, g])
        s00, s11, s22 = float(cov6[b, 0, g]), float(cov6[b, 1, g]), float(cov6[b, 2, g])
        s01, s02, s12 = float(cov6[b, 3, g]), float(cov6[b, 4, g]), float(cov6[b, 5, g])
        d3, it = float(det3[b, g]), float(inten[b, g])
        for c in range(n_c):
            u, v, ju0, ju1, ju2, jv0, jv1, jv2, _u0, _t, _cl = _stage1_point(m0, m1, m2, cosv[c], sinv[c], cone,
                                                                              sod, sdd, dmin)
            a0, a1, a2 = _sym_mul(s00, s11, s22, s01, s02, s12, ju0, ju1, ju2)
            b0, b1, b2 = _sym_mul(s00, s11, s22, s01, s02, s12, jv0, jv1, jv2)
            s_cc = (ju0 * a0 + ju1 * a1 + ju2 * a2) / (du * du)
            s_cr = (ju0 * b0 + ju1 * b1 + ju2 * b2) / (du * dv)
            s_rr = (jv0 * b0 + jv1 * b1 + jv2 * b2) / (dv * dv)
            det = s_cc * s_rr - s_cr * s_cr
            if cone:
                uu = ju0 * ju0 + ju1 * ju1 + ju2 * ju2
                vv = jv0 * jv0 + jv1 * jv1 + jv2 * jv2
                uv = ju0 * jv0 + ju1 * jv1 + ju2 * jv2
                det_jj = uu * vv - uv * uv
            else:
                det_jj = 1.0
            o = out[b, c, g]
            o[0] = u / du + col0
            o[1] = v / dv + row0
            o[2] = s_rr / det
            o[3] = -s_cr / det
            o[4] = s_cc / det
            o[5] = it * math.sqrt(two_pi * d3 * det_jj / (det * (du * dv) ** 2))


@njit(parallel=True, fastmath=False)
def _stage1_backward_kernel(means, cov6, det3, inten, cosv, sinv, cone, sod, sdd, dmin, dv, du, grad,
                            g_means, g_cov6, g_det3, g_inten):
    """grad [B, C, k, 6] -> gradients of means, cov6, det3, intensities (summed over views; one thread per
    Gaussian, no atomics). Hand-derived chain rule of ``_stage1_forward_kernel``."""
    n_b, k = means.shape[0], means.shape[2]
    n_c = cosv.shape[0]
    two_pi = 2.0 * math.pi
    for idx in prange(n_b * k):
        b = idx // k
        g = idx - b * k
        m0, m1, m2 = float(means[b, 0, g]), float(means[b, 1, g]), float(means[b, 2, g])
        s00, s11, s22 = float(cov6[b, 0, g]), float(cov6[b, 1, g]), float(cov6[b, 2, g])
        s01, s02, s12 = float(cov6[b, 3, g]), float(cov6[b, 4, g]), float(cov6[b, 5, g])
        d3, it = float(det3[b, g]), float(inten[b, g])
        gm0 = gm1 = gm2 = 0.0
        gs00 = gs11 = gs22 = gs01 = gs02 = gs12 = 0.0
        gd3 = gi = 0.0
        for c in range(n_c):
            cs, sn = cosv[c], sinv[c]
            u, v, ju0, ju1, ju2, jv0, jv1, jv2, u0, t, clamped = _stage1_point(m0, m1, m2, cs, sn, cone, sod, sdd,
                                                                               dmin)
            a0, a1, a2 = _sym_mul(s00, s11, s22, s01, s02, s12, ju0, ju1, ju2)  # S j_u
            b0, b1, b2 = _sym_mul(s00, s11, s22, s01, s02, s12, jv0, jv1, jv2)  # S j_v
            s_cc = (ju0 * a0 + ju1 * a1 + ju2 * a2) / (du * du)
            s_cr = (ju0 * b0 + ju1 * b1 + ju2 * b2) / (du * dv)
            s_rr = (jv0 * b0 + jv1 * b1 + jv2 * b2) / (dv * dv)
            det = s_cc * s_rr - s_cr * s_cr
            if cone:
                uu = ju0 * ju0 + ju1 * ju1 + ju2 * ju2
                vv = jv0 * jv0 + jv1 * jv1 + jv2 * jv2
                uv = ju0 * jv0 + ju1 * jv1 + ju2 * jv2
                det_jj = uu * vv - uv * uv
            else:
                uu = vv = uv = 0.0
                det_jj = 1.0
            a_unit = math.sqrt(two_pi * d3 * det_jj / (det * (du * dv) ** 2))
            amp = it * a_unit
            gr = grad[b, c, g]
            g0, g1, g2, g3, g4, g5 = float(gr[0]), float(gr[1]), float(gr[2]), float(gr[3]), float(gr[4]), float(gr[5])
            gi += g5 * a_unit
            if d3 > 0.0:
                gd3 += g5 * amp * 0.5 / d3
            g_det = -(g2 * s_rr - g3 * s_cr + g4 * s_cc) / (det * det) - g5 * amp * 0.5 / det
            g_srr = g2 / det + g_det * s_cc
            g_scr = -g3 / det - 2.0 * g_det * s_cr
            g_scc = g4 / det + g_det * s_rr
            qa = g_scc / (du * du)  # d/d (j_u^T S j_u)
            qb = g_scr / (du * dv)  # d/d (j_u^T S j_v)
            qc = g_srr / (dv * dv)  # d/d (j_v^T S j_v)
            gs00 += qa * ju0 * ju0 + qb * ju0 * jv0 + qc * jv0 * jv0
            gs11 += qa * ju1 * ju1 + qb * ju1 * jv1 + qc * jv1 * jv1
            gs22 += qa * ju2 * ju2 + qb * ju2 * jv2 + qc * jv2 * jv2
            gs01 += 2.0 * qa * ju0 * ju1 + qb * (ju0 * jv1 + ju1 * jv0) + 2.0 * qc * jv0 * jv1
            gs02 += 2.0 * qa * ju0 * ju2 + qb * (ju0 * jv2 + ju2 * jv0) + 2.0 * qc * jv0 * jv2
            gs12 += 2.0 * qa * ju1 * ju2 + qb * (ju1 * jv2 + ju2 * jv1) + 2.0 * qc * jv1 * jv2
            g_u = g0 / du
            g_v = g1 / dv
            if not cone:
                gm0 += -sn * g_u
                gm1 += cs * g_u
                gm2 += g_v
                continue
            # gradient w.r.t. the Jacobian rows
            gju0 = 2.0 * qa * a0 + qb * b0
            gju1 = 2.0 * qa * a1 + qb * b1
            gjv0 = 2.0 * qc * b0 + qb * a0
            gjv1 = 2.0 * qc * b1 + qb * a1
            gjv2 = 2.0 * qc * b2 + qb * a2
            if det_jj > 0.0:
                gjj = g5 * amp * 0.5 / det_jj
                gju0 += gjj * 2.0 * (ju0 * vv - uv * jv0)
                gju1 += gjj * 2.0 * (ju1 * vv - uv * jv1)
                gjv0 += gjj * 2.0 * (jv0 * uu - uv * ju0)
                gjv1 += gjj * 2.0 * (jv1 * uu - uv * ju1)
                gjv2 += gjj * 2.0 * (jv2 * uu - uv * ju2)
            # j_u, j_v, u, v as functions of t = 1/depth, u0 and m2
            g_t = (g_u * sdd * u0 + g_v * sdd * m2 + gju0 * (-sdd * sn - 2.0 * sdd * u0 * t * cs)
                   + gju1 * (sdd * cs - 2.0 * sdd * u0 * t * sn) + gjv0 * (-2.0 * sdd * m2 * t * cs)
                   + gjv1 * (-2.0 * sdd * m2 * t * sn) + gjv2 * sdd)
            g_u0 = g_u * sdd * t - gju0 * sdd * t * t * cs - gju1 * sdd * t * t * sn
            gm2 += g_v * sdd * t - gjv0 * sdd * t * t * cs - gjv1 * sdd * t * t * sn
            g_depth = 0.0 if clamped else -g_t * t * t
            gm0 += g_depth * cs - sn * g_u0
            gm1 += g_depth * sn + cs * g_u0
        g_means[b, 0, g] = gm0
        g_means[b, 1, g] = gm1
        g_means[b, 2, g] = gm2
        g_cov6[b, 0, g] = gs00
        g_cov6[b, 1, g] = gs11
        g_cov6[b, 2, g] = gs22
        g_cov6[b, 3, g] = gs01
        g_cov6[b, 4, g] = gs02
        g_cov6[b, 5, g] = gs12
        g_det3[b, g] = gd3
        g_inten[b, g] = gi


def _stage1_geometry(geometry, views: slice) -> tuple:
    angles = geometry.angles[views].to(torch.float64).numpy()
    cone = isinstance(geometry, ConeBeam)
    sod = float(geometry.source_to_origin) if cone else 0.0
    sdd = float(geometry.source_to_detector) if cone else 0.0
    dv, du = geometry.detector_spacing
    return (np.ascontiguousarray(np.cos(angles)), np.ascontiguousarray(np.sin(angles)), cone, sod, sdd, 1e-3 * sod,
            float(dv), float(du))


class _SplatParamsNumba(torch.autograd.Function):
    """Stage 1 fused in numba (values as :func:`splat_params`, float64 arithmetic inside) with its hand-derived
    backward: a few hundred elementwise torch ops per call become two passes over the Gaussians."""

    @staticmethod
    def forward(ctx, means, cov, det3, intensities, geometry, views):
        ctx.save_for_backward(means, cov, det3, intensities)
        ctx.geo = _stage1_geometry(geometry, views)
        cosv, sinv, cone, sod, sdd, dmin, dv, du = ctx.geo
        arrays = [t.detach().contiguous().numpy() for t in (means, cov, det3, intensities)]
        out = np.empty((means.shape[0], cosv.shape[0], means.shape[2], SPLAT_PARAMS), dtype=arrays[0].dtype)
        _stage1_forward_kernel(*arrays, cosv, sinv, cone, sod, sdd, dmin, dv, du, float(geometry.axis_column),
                               float(geometry.centre_row), out)
        return torch.from_numpy(out)

    @staticmethod
    def backward(ctx, grad):
        cosv, sinv, cone, sod, sdd, dmin, dv, du = ctx.geo
        tensors = ctx.saved_tensors
        arrays = [t.detach().contiguous().numpy() for t in tensors]
        outs = [np.empty_like(a) for a in arrays]
        _stage1_backward_kernel(*arrays, cosv, sinv, cone, sod, sdd, dmin, dv, du,
                                grad.detach().to(tensors[0].dtype).contiguous().numpy(), *outs)
        grads = [torch.from_numpy(o) if need else None for o, need in zip(outs, ctx.needs_input_grad)]
        return (*grads, None, None)


def splat_params_numba(means: torch.Tensor, cov6: torch.Tensor, det3: torch.Tensor, intensities: torch.Tensor,
                       geometry, views: slice) -> torch.Tensor:
    """:func:`splat_params` (the torch reference) fused in numba, differentiable; CPU tensors only."""
    return _SplatParamsNumba.apply(means, cov6, det3, intensities, geometry, views)


def _numba_forward(params: torch.Tensor, rows: int, cols: int, cutoff: float) -> torch.Tensor:
    """Numba splat, no autograd: ``[B, C, k, 6]`` -> ``[B, C, rows, cols]``."""
    if params.device.type != "cpu":
        raise ValueError(f"the numba projector backend needs CPU tensors, got {params.device}")
    flat = params.detach().reshape(-1, *params.shape[2:]).contiguous().numpy()  # [N, k, 6]
    threads = max(1, get_num_threads())
    partial_out = np.zeros((threads, flat.shape[0], rows, cols), dtype=flat.dtype)  # one image set per thread
    _splat_forward_kernel(flat, float(cutoff), flat.dtype == np.float64, threads, partial_out)
    out = torch.from_numpy(partial_out.sum(0) if threads > 1 else partial_out[0])
    return out.reshape(params.shape[0], params.shape[1], rows, cols)


def _numba_vjp(params: torch.Tensor, grad: torch.Tensor, cutoff: float) -> torch.Tensor:
    """d(sum(grad * splat(params))) / d params: ``[B, C, k, 6]``."""
    flat = params.detach().reshape(-1, *params.shape[2:]).contiguous().numpy()
    g = grad.detach().to(params.dtype).reshape(-1, *grad.shape[2:]).contiguous().numpy()  # [N, rows, cols]
    grad_params = np.empty_like(flat)
    _splat_backward_kernel(flat, float(cutoff), flat.dtype == np.float64, g, grad_params)
    return torch.from_numpy(grad_params).reshape(params.shape)


class _NumbaSplat(torch.autograd.Function):
    @staticmethod
    def forward(ctx, params, rows, cols, cutoff):
        ctx.save_for_backward(params)
        ctx.cutoff = float(cutoff)
        return _numba_forward(params, rows, cols, cutoff)

    @staticmethod
    def backward(ctx, grad):
        (params,) = ctx.saved_tensors
        return _numba_vjp(params, grad, ctx.cutoff), None, None, None


def splat_numba(params: torch.Tensor, rows: int, cols: int, cutoff: float) -> torch.Tensor:
    """Differentiable numba CPU splat: ``[B, C, k, 6]`` -> ``[B, C, rows, cols]``."""
    return _NumbaSplat.apply(params, rows, cols, cutoff)


VJP_PAIRS = 1 << 23  # (Gaussian, pixel) evaluations per autograd chunk in the torch / reference VJPs


def _dense_cost(params: torch.Tensor, rows: int, cols: int, cutoff: float) -> float:
    return params.shape[0] * params.shape[1] * rows * cols


def _autograd_vjp(splat, cost):
    """VJP of a torch splat by autograd, in chunks over k (the splat is a sum over Gaussians)."""
    def vjp(params: torch.Tensor, grad: torch.Tensor, cutoff: float) -> torch.Tensor:
        rows, cols = grad.shape[-2:]
        step = max(1, int(VJP_PAIRS // max(1.0, cost(params, rows, cols, cutoff))))
        out = torch.empty_like(params)
        with torch.enable_grad():
            for start in range(0, params.shape[2], step):
                leaf = params[:, :, start:start + step].detach().requires_grad_(True)
                image = splat(leaf, rows, cols, cutoff)
                out[:, :, start:start + step] = torch.autograd.grad(image, leaf, grad)[0]
        return out
    return vjp


SPLATTERS = {"reference": splat_reference, "torch": splat_torch, "numba": splat_numba}
FORWARDS = {"reference": splat_reference, "torch": splat_torch, "numba": _numba_forward}
VJPS = {"reference": _autograd_vjp(splat_reference, _dense_cost), "torch": splat_torch_vjp, "numba": _numba_vjp}


# ----------------------------------------------------------------- driver
def resolve_backend(gaussians: GaussianSet, backend: str = "auto") -> str:
    """The concrete backend ``project_gaussians`` will use: numba on CPU when available, else torch
    (``backends.resolve_backend``; no environment override, an unusable numba is a ``ValueError``)."""
    return backends.resolve_backend(gaussians, backend, unavailable_error=ValueError)


def view_chunk_size(batch: int, k: int, n_views: int, max_chunk_mb: float = DEFAULT_CHUNK_MB) -> int:
    """Views per chunk so stage 1 stays near ``max_chunk_mb``; a multiple of the thread count if possible."""
    per_view = max(1, batch * k * _BYTES_PER_PAIR)
    chunk = int(max(1, min(n_views, max_chunk_mb * 2**20 // per_view)))
    threads = max(1, get_num_threads())
    if threads < chunk < n_views:
        chunk -= chunk % threads
    return chunk


class _ProjectGaussians(torch.autograd.Function):
    """Chunked over views; the backward recomputes stage 1 per chunk and calls the backend's VJP,
    so no per-(Gaussian, view) tensor outlives its chunk. (No double backward.)"""

    @staticmethod
    def forward(ctx, means, cov, det3, intensities, geometry, cutoff, backend, chunk):
        ctx.save_for_backward(means, cov, det3, intensities)
        ctx.args = (geometry, cutoff, backend, chunk)
        outs = []
        for views in _view_slices(geometry.n_views, chunk):
            params = splat_params(means, cov, det3, intensities, geometry, views)  # [B, C, k, 6]
            outs.append(FORWARDS[backend](params, geometry.rows, geometry.cols, cutoff))
        return torch.cat(outs, dim=1)

    @staticmethod
    def backward(ctx, grad):
        geometry, cutoff, backend, chunk = ctx.args
        leaves = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad)]
        with torch.enable_grad():
            for views in _view_slices(geometry.n_views, chunk):
                params = splat_params(*leaves, geometry, views)
                grad_params = VJPS[backend](params.detach(), grad[:, views].contiguous(), cutoff)
                torch.autograd.backward(params, grad_params)
        return (*(t.grad if need else None for t, need in zip(leaves, ctx.needs_input_grad)), None, None, None, None)


def _view_slices(n_views: int, chunk: int) -> list[slice]:
    return [slice(v0, min(n_views, v0 + chunk)) for v0 in range(0, n_views, chunk)]


def project_gaussians(gaussians: GaussianSet, geometry, *, cutoff: float = 3.0, backend: str = "auto",
                      max_chunk_mb: float = DEFAULT_CHUNK_MB) -> torch.Tensor:
    """Analytic projections ``[B, V, rows, cols]`` (mm x intensity) of ``gaussians`` under ``geometry``.

    ``cutoff``: each splat covers the pixels within this 2D Mahalanobis radius.
    Differentiable w.r.t. centres, scales, quaternions and intensities.
    """
    if not isinstance(gaussians, GaussianSet):
        raise GaussianValidationError(f"gaussians must be a GaussianSet, got {type(gaussians).__name__}")
    geometry = check_geometry(geometry)
    if not (isinstance(cutoff, (int, float)) and math.isfinite(cutoff) and cutoff > 0):
        raise ValueError(f"cutoff must be a positive number of sigmas, got {cutoff!r}")
    name = resolve_backend(gaussians, backend)
    log.debug("project_gaussians: backend %s", name)
    means, cov, det3 = gaussians_mm(gaussians, geometry)
    chunk = view_chunk_size(gaussians.batch_size, gaussians.num_gaussians, geometry.n_views, max_chunk_mb)
    if name == "numba" and chunk >= geometry.n_views:
        # one chunk fits the memory budget: keep stage 1's autograd graph instead of recomputing it in backward
        params = splat_params_numba(means, cov, det3, gaussians.intensities, geometry, slice(0, geometry.n_views))
        return splat_numba(params, geometry.rows, geometry.cols, float(cutoff))
    return _ProjectGaussians.apply(means, cov, det3, gaussians.intensities, geometry, float(cutoff), name, chunk)


__all__ = ["project_gaussians", "resolve_backend", "splat_params", "splat_params_numba", "splat_reference", "splat_torch", "splat_numba",
           "gaussians_mm", "BACKENDS"]
