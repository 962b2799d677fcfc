"""Independent classical baselines with RTK (the Reconstruction Toolkit, PyPI ``itk-rtk``, CPU).

Optional: install with ``pip install -e ".[bench]"`` (or ``pip install itk-rtk``). Used by
``benchmarks/recon_init.py`` on the same simulated scan as the Gaussian fits:

* ``rtk_fdk``: RTK's FDK (Ram-Lak, no apodisation), the analytic baseline from independent code;
* ``rtk_sart``: RTK's SART (Joseph projectors), ``iterations`` passes over all views, positivity enforced;
* ``rtk_cg``: RTK's conjugate gradient on the least-squares problem, with an optional Tikhonov term
  (``gamma``, Laplacian regularisation as RTK defines it).

Geometry mapping (checked by :func:`check_mapping`, which compares RTK's Joseph forward projection with
our projections of the same volume). Our frame: volume axes (x0, x1, x2), rotation axis x2, source at
``-SOD (cos t, sin t, 0)``, detector columns along ``(-sin t, cos t, 0)``, rows along x2
(``medgmae_core.xray.geometry``). RTK: rotation axis y, source at ``SID (sin p, 0, cos p)``. With RTK's
(X, Y, Z) = our (x1, x2, x0) (a cyclic permutation, so a rotation) the source matches for ``p = t + 180 deg``
and RTK's detector u axis is our ``-e_u``: columns are reversed, and the column offset moves the projection
image's origin.
"""
from __future__ import annotations

import math
import time

import numpy as np


def available() -> str | None:
    """None when RTK imports, else why not."""
    try:
        import itk  # noqa: F401
        from itk import RTK  # noqa: F401
    except Exception as exc:  # ImportError or a broken binary
        return f"{type(exc).__name__}: {exc}"
    return None


def _threads(n: int | None) -> None:
    import itk

    if n:
        itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(int(n))


def _volume_image(array_dhw: np.ndarray, spacing, itk):
    """Our ``[D, H, W]`` (x0, x1, x2) -> an ITK image with (X, Y, Z) = (x1, x2, x0), centred."""
    arr = np.ascontiguousarray(np.asarray(array_dhw, dtype=np.float32).transpose(0, 2, 1))  # [x0][x2][x1] = [Z][Y][X]
    img = itk.image_from_array(arr)
    n0, n1, n2 = array_dhw.shape
    s0, s1, s2 = (float(s) for s in spacing)
    img.SetSpacing([s1, s2, s0])
    img.SetOrigin([-(n1 - 1) * s1 / 2, -(n2 - 1) * s2 / 2, -(n0 - 1) * s0 / 2])
    return img


def _volume_array(img, itk) -> np.ndarray:
    return np.asarray(itk.array_from_image(img)).transpose(0, 2, 1).copy()  # back to [D, H, W]


def _projection_image(projections: np.ndarray, geometry, itk):
    """Our ``[V, rows, cols]`` -> RTK's stack ``[V][v][u]`` with the columns reversed."""
    p = np.ascontiguousarray(np.asarray(projections, dtype=np.float32)[:, :, ::-1])
    img = itk.image_from_array(p)
    rows, cols = p.shape[1:]
    dv, du = geometry.detector_spacing
    centre_col = (cols - 1) / 2 + geometry.detector_offset  # our column of the rotation axis
    reversed_centre = (cols - 1) - centre_col
    img.SetSpacing([float(du), float(dv), 1.0])
    img.SetOrigin([-reversed_centre * du, -(rows - 1) / 2 * dv, 0.0])
    return img


def _geometry(geometry, rtk):
    g = rtk.ThreeDCircularProjectionGeometry.New()
    for t in np.asarray(geometry.angles, dtype=np.float64):
        g.AddProjection(float(geometry.source_to_origin), float(geometry.source_to_detector),
                        math.degrees(float(t)) + 180.0, 0.0, 0.0)
    return g


def _empty_volume(shape, spacing, itk):
    return _volume_image(np.zeros(shape, np.float32), spacing, itk)


def forward_project(volume: np.ndarray, spacing, geometry, *, threads: int | None = 1) -> np.ndarray:
    """RTK Joseph forward projection of our volume, returned in our ``[V, rows, cols]`` layout."""
    import itk
    from itk import RTK as rtk

    _threads(threads)
    vol = _volume_image(volume, spacing, itk)
    zeros = np.zeros((len(geometry.angles), *geometry.detector_shape), np.float32)
    proj0 = _projection_image(zeros, geometry, itk)
    f = rtk.JosephForwardProjectionImageFilter[type(proj0), type(vol)].New()
    f.SetInput(0, proj0)
    f.SetInput(1, vol)
    f.SetGeometry(_geometry(geometry, rtk))
    f.Update()
    out = np.asarray(itk.array_from_image(f.GetOutput()))
    return out[:, :, ::-1].copy()


def fdk(projections: np.ndarray, geometry, shape, spacing, *, threads: int | None = 1) -> tuple[np.ndarray, float]:
    """RTK FDK -> (``[D, H, W]`` volume, seconds)."""
    import itk
    from itk import RTK as rtk

    _threads(threads)
    t0 = time.perf_counter()
    proj = _projection_image(projections, geometry, itk)
    vol0 = _empty_volume(shape, spacing, itk)
    f = rtk.FDKConeBeamReconstructionFilter[type(vol0)].New()
    f.SetInput(0, vol0)
    f.SetInput(1, proj)
    f.SetGeometry(_geometry(geometry, rtk))
    f.GetRampFilter().SetTruncationCorrection(0.0)
    f.GetRampFilter().SetHannCutFrequency(0.0)
    f.Update()
    return _volume_array(f.GetOutput(), itk), time.perf_counter() - t0


def sart(projections: np.ndarray, geometry, shape, spacing, *, iterations: int = 10, lam: float = 0.3,
         threads: int | None = 1, callback=None) -> tuple[np.ndarray, float, list]:
    """RTK SART (Joseph), positivity on. ``callback(volume, iteration, seconds)`` after each pass (re-run
    from scratch per pass count would cost quadratically, so passes are chained: each starts from the last)."""
    import itk
    from itk import RTK as rtk

    _threads(threads)
    proj = _projection_image(projections, geometry, itk)
    geo = _geometry(geometry, rtk)
    current = _empty_volume(shape, spacing, itk)
    history, seconds = [], 0.0
    for it in range(1, int(iterations) + 1):
        t0 = time.perf_counter()
        f = rtk.SARTConeBeamReconstructionFilter[type(current), type(proj)].New()
        f.SetInput(0, current)
        f.SetInput(1, proj)
        f.SetGeometry(geo)
        f.SetNumberOfIterations(1)
        f.SetLambda(float(lam))
        f.SetEnforcePositivity(True)
        f.Update()
        current = f.GetOutput()
        current.DisconnectPipeline()
        seconds += time.perf_counter() - t0
        if callback is not None:
            history.append(callback(_volume_array(current, itk), it, seconds))
    return _volume_array(current, itk), seconds, history


def conjugate_gradient(projections: np.ndarray, geometry, shape, spacing, *, iterations: int = 20,
                       gamma: float = 0.0, threads: int | None = 1) -> tuple[np.ndarray, float]:
    """RTK conjugate gradient (least squares, optional Laplacian regularisation ``gamma``)."""
    import itk
    from itk import RTK as rtk

    _threads(threads)
    t0 = time.perf_counter()
    proj = _projection_image(projections, geometry, itk)
    vol0 = _empty_volume(shape, spacing, itk)
    f = rtk.ConjugateGradientConeBeamReconstructionFilter[type(vol0)].New()
    f.SetInput(0, vol0)
    f.SetInput(1, proj)
    ones = _projection_image(np.ones_like(projections, dtype=np.float32), geometry, itk)
    f.SetInput(2, ones)  # per-ray weights
    f.SetGeometry(_geometry(geometry, rtk))
    f.SetNumberOfIterations(int(iterations))
    if gamma:
        f.SetGamma(float(gamma))
    f.Update()
    return _volume_array(f.GetOutput(), itk), time.perf_counter() - t0


def check_mapping(volume: np.ndarray, spacing, geometry, ours: np.ndarray) -> float:
    """Relative L2 difference between RTK's forward projection and ours (small when the mapping is right)."""
    theirs = forward_project(volume, spacing, geometry)
    return float(np.linalg.norm(theirs - ours) / max(np.linalg.norm(ours), 1e-30))
