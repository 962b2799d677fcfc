"""PNG overviews: axial / coronal / sagittal slices (CT, mask, prediction) with Gaussian outlines, and a 3D view.

2D panels use matplotlib's Agg backend. Gaussian outlines are the exact cross-sections of each ``sigma``
ellipsoid with the slice plane (conditional ellipses, see :func:`slice_ellipses`). The 3D panel renders the
glyph polydata offscreen with VTK (EGL; ``VTK_DEFAULT_OPENGL_WINDOW=vtkEGLRenderWindow``); if offscreen GL is
unavailable it falls back to a matplotlib 3D scatter and logs a warning.

Arrays are ``[I, J, K]`` in RAS-like order (the prepared grid): axial = fixed k (image axes i, j), coronal =
fixed j (i, k), sagittal = fixed i (j, k). Images are shown in radiological convention for axial and coronal
(patient right on the left of the picture) when the grid is RAS-oriented.
"""
from __future__ import annotations

import ctypes.util
import logging
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import atomic_path
from ..gaussians import GaussianSet

log = logging.getLogger(__name__)

# plane name -> (fixed axis, (horizontal axis, vertical axis))
PLANES = {"axial": (2, (0, 1)), "coronal": (1, (0, 2)), "sagittal": (0, (1, 2))}


def voxel_gaussians(gaussians: GaussianSet, shape) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centres ``[n, 3]``, covariances ``[n, 3, 3]`` in voxel units and intensities ``[n]`` (batch flattened)."""
    ext = np.asarray(shape, dtype=np.float64) - 1
    gs = gaussians.detach().to("cpu", torch.float64)
    centres = gs.centres.reshape(-1, 3).numpy() * ext
    cov = gs.covariances().reshape(-1, 3, 3).numpy() * ext[:, None] * ext[None, :]
    return centres, cov, gs.intensities.reshape(-1).numpy()


def slice_ellipses(centres: np.ndarray, cov: np.ndarray, axis: int, index: float, sigma: float = 2.0):
    """Cross-sections of the ``sigma`` ellipsoids with the plane ``x[axis] = index``.

    The plane cuts ``(x - mu)^T Sigma^-1 (x - mu) = sigma^2`` in an ellipse with centre
    ``mu_b + Sigma_ba / Sigma_aa * d``, shape ``Sigma_bb - Sigma_ba Sigma_ab / Sigma_aa`` and squared radius
    ``sigma^2 - d^2 / Sigma_aa`` (``d = index - mu_a``). Returns ``(keep [n] bool, centres [m, 2], widths [m],
    heights [m], angles_deg [m])`` for the Gaussians the plane cuts, in the plane's (b0, b1) coordinates.
    """
    b = [a for a in range(3) if a != axis]
    d = index - centres[:, axis]
    s_aa = cov[:, axis, axis]
    r2 = sigma ** 2 - d ** 2 / s_aa
    keep = r2 > 0
    c, d, s_aa, r2 = cov[keep], d[keep], s_aa[keep], r2[keep]
    s_ba = c[:, b, axis]  # [m, 2]
    centre = centres[keep][:, b] + s_ba / s_aa[:, None] * d[:, None]
    cond = c[:, b][:, :, b] - s_ba[:, :, None] * s_ba[:, None, :] / s_aa[:, None, None]  # [m, 2, 2]
    evals, evecs = np.linalg.eigh(cond)
    evals = np.clip(evals, 0, None)
    radius = np.sqrt(r2)
    widths = 2 * radius * np.sqrt(evals[:, 1])
    heights = 2 * radius * np.sqrt(evals[:, 0])
    angles = np.degrees(np.arctan2(evecs[:, 1, 1], evecs[:, 0, 1]))
    return keep, centre, widths, heights, angles


def offscreen_gl_available() -> bool:
    """Cheap check before touching VTK's OpenGL: an EGL library (headless) or an X display must exist."""
    return bool(os.environ.get("DISPLAY")) or ctypes.util.find_library("EGL") is not None


def render_glyphs_offscreen(polydata, size: tuple[int, int] = (600, 600), *, scalar_name: str = "intensity",
                            scalar_range: tuple[float, float] | None = None,
                            view_up=(0.0, 0.0, 1.0), direction=(0.0, 1.0, 0.0)) -> np.ndarray:
    """Offscreen VTK render of glyph polydata -> RGB ``uint8 [H, W, 3]``. Camera looks along ``-direction``
    (default: from anterior), ``view_up`` superior."""
    if not offscreen_gl_available():
        raise RuntimeError("no EGL library and no X display for offscreen OpenGL "
                           "(Debian/Ubuntu: apt-get install -y libegl1 libgl1-mesa-dri)")
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    import vtk  # lazy: optional dependency (slicer-core brings VTK); after the OpenGL window choice above
    from vtk.util import numpy_support as ns

    mapper = vtk.vtkPolyDataMapper()
    mapper.SetInputData(polydata)
    values = polydata.GetPointData().GetArray(scalar_name)
    if values is not None and values.GetNumberOfTuples():
        mapper.SetScalarModeToUsePointFieldData()
        mapper.SelectColorArray(scalar_name)
        mapper.ScalarVisibilityOn()
        lo, hi = scalar_range or values.GetRange()
        mapper.SetScalarRange(lo, max(hi, lo + 1e-6))
        lut = vtk.vtkLookupTable()
        lut.SetHueRange(0.66, 0.0)  # blue (faint) -> red (bright)
        lut.Build()
        mapper.SetLookupTable(lut)
    actor = vtk.vtkActor()
    actor.SetMapper(mapper)
    renderer = vtk.vtkRenderer()
    renderer.AddActor(actor)
    renderer.SetBackground(0.08, 0.08, 0.1)
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.AddRenderer(renderer)
    window.SetSize(*size)
    camera = renderer.GetActiveCamera()
    bounds = polydata.GetBounds()
    centre = [(bounds[0] + bounds[1]) / 2, (bounds[2] + bounds[3]) / 2, (bounds[4] + bounds[5]) / 2]
    camera.SetFocalPoint(*centre)
    camera.SetPosition(*(np.asarray(centre) + 1000.0 * np.asarray(direction)))
    camera.SetViewUp(*view_up)
    renderer.ResetCamera()
    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.SetInputBufferTypeToRGB()
    grab.ReadFrontBufferOff()
    grab.Update()
    img = grab.GetOutput()
    w, h, _ = img.GetDimensions()
    rgb = ns.vtk_to_numpy(img.GetPointData().GetScalars()).reshape(h, w, 3)[::-1].copy()
    window.Finalize()
    return rgb


def _show_slice(ax, image, spacing_hv, *, cmap="gray", vmin=0.0, vmax=1.0, flip_h=False, alpha=1.0):
    h, v = image.shape
    extent = (-0.5, h - 0.5, -0.5, v - 0.5)
    ax.imshow(image.T, origin="lower", cmap=cmap, vmin=vmin, vmax=vmax, extent=extent, alpha=alpha,
              aspect=spacing_hv[1] / spacing_hv[0], interpolation="nearest")
    if flip_h:
        ax.set_xlim(h - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])


def save_figure(fig, path: str | Path, *, dpi: float | None = None) -> Path:
    """The one PNG writer: ``fig`` goes to a temporary file beside ``path`` (registered with ``errors``, so a failed
    command removes it), then is renamed over ``path``; a failure never leaves a partial PNG under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", **({} if dpi is None else {"dpi": dpi}))
    return path


def overview_png(path: str | Path, *, ct, prediction=None, mask=None, gaussians: GaussianSet | None = None,
                 glyph_polydata=None, spacing=(1.5, 1.5, 1.5), slices: dict[str, int] | None = None,
                 sigma: float = 2.0, max_outlines: int = 300, title: str | None = None,
                 radiological: bool = True) -> Path:
    """Write the demo's overview PNG.

    ``ct``, ``prediction`` ``[I, J, K]`` in display units (HU-windowed [0, 1]); ``mask`` ``[I, J, K]`` (1 = hidden
    patch); ``gaussians`` in normalised coords of that grid (outlines of the ``max_outlines`` brightest);
    ``glyph_polydata`` for the 3D panel. Rows: axial, coronal, sagittal; columns: CT with the mask, the masked
    input, the prediction, the prediction with Gaussian outlines; the right column is the 3D glyph view.
    """
    import matplotlib  # lazy: heavy, loaded when a figure is drawn

    matplotlib.use("Agg", force=False)
    # lazy: as above; pyplot only once the Agg backend is chosen
    import matplotlib.pyplot as plt
    from matplotlib.collections import EllipseCollection
    from matplotlib.colors import ListedColormap

    as_np = lambda a: None if a is None else (a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a))  # noqa: E731
    ct, prediction, mask = as_np(ct), as_np(prediction), as_np(mask)
    if ct is None or ct.ndim != 3:
        raise ValueError(f"overview ct must be a 3D array, got {None if ct is None else ct.shape}")
    for name, arr in (("prediction", prediction), ("mask", mask)):
        if arr is not None and arr.shape != ct.shape:
            raise ValueError(f"overview {name} shape {arr.shape} differs from ct shape {ct.shape}")
    shape = ct.shape
    spacing = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,))
    if gaussians is not None:
        g_centres, g_cov, g_int = voxel_gaussians(gaussians, shape)
        order = np.argsort(-g_int)[:max_outlines]
        g_centres, g_cov, g_int = g_centres[order], g_cov[order], g_int[order]
    slices = dict(slices or {})
    columns = [("CT + mask", "ct_mask"), ("masked input", "masked"), ("prediction", "pred"),
               (f"Gaussians ({sigma:g}σ)", "outlines")]
    if prediction is None:
        columns = [c for c in columns if c[1] not in ("pred", "outlines")] + [(f"Gaussians ({sigma:g}σ)", "outlines")]
    if mask is None:
        columns = [c for c in columns if c[1] != "masked"]
    ncol = len(columns) + 1
    fig = plt.figure(figsize=(3.2 * ncol, 3.3 * 3 + 0.4), dpi=100)
    grid = fig.add_gridspec(3, ncol)
    cmap = plt.get_cmap("plasma")
    for row, (plane, (axis, (h_ax, v_ax))) in enumerate(PLANES.items()):
        index = int(slices.get(plane, shape[axis] // 2))
        take = lambda vol: np.take(vol, index, axis=axis)  # noqa: E731
        flip = radiological and plane in ("axial", "coronal")
        for col, (label, kind) in enumerate(columns):
            ax = fig.add_subplot(grid[row, col])
            base = take(ct)
            if kind == "ct_mask":
                _show_slice(ax, base, spacing[[h_ax, v_ax]], flip_h=flip)
                if mask is not None:
                    overlay = np.ma.masked_where(take(mask) < 0.5, take(mask))
                    _show_slice(ax, overlay, spacing[[h_ax, v_ax]], cmap=ListedColormap(["#ff3030"]), alpha=0.3,
                                flip_h=flip)
            elif kind == "masked":
                _show_slice(ax, base * (1 - take(mask)), spacing[[h_ax, v_ax]], flip_h=flip)
            elif kind == "pred":
                _show_slice(ax, take(prediction), spacing[[h_ax, v_ax]], flip_h=flip)
            else:
                _show_slice(ax, take(prediction) if prediction is not None else base, spacing[[h_ax, v_ax]],
                            flip_h=flip)
                if gaussians is not None and len(g_int):
                    keep, centre, widths, heights, angles = slice_ellipses(g_centres, g_cov, axis, index, sigma)
                    if keep.any():
                        lo, hi = float(g_int.min()), float(g_int.max()) + 1e-9
                        ax.add_collection(EllipseCollection(
                            widths, heights, angles, units="xy", offsets=centre, offset_transform=ax.transData,
                            facecolors="none", edgecolors=cmap((g_int[keep] - lo) / (hi - lo)), linewidths=0.8),
                            autolim=False)
                        h, v = base.shape
                        ax.set_xlim((h - 0.5, -0.5) if flip else (-0.5, h - 0.5))
                        ax.set_ylim(-0.5, v - 0.5)
            if row == 0:
                ax.set_title(label, fontsize=10)
            if col == 0:
                ax.set_ylabel(f"{plane} {index}", fontsize=10)
    ax3d_spec = grid[:, ncol - 1]
    if glyph_polydata is not None and glyph_polydata.GetNumberOfPoints():
        try:
            rgb = render_glyphs_offscreen(glyph_polydata)
            ax = fig.add_subplot(ax3d_spec)
            ax.imshow(rgb)
            ax.set_axis_off()
            ax.set_title(f"3D glyphs ({glyph_polydata.GetNumberOfCells()} triangles)", fontsize=10)
        except Exception as exc:  # offscreen GL missing: scatter instead
            log.warning("offscreen VTK rendering unavailable (%s); 3D panel falls back to a matplotlib scatter", exc)
            _scatter_3d(fig, ax3d_spec, gaussians, shape)
    elif gaussians is not None:
        _scatter_3d(fig, ax3d_spec, gaussians, shape)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    try:
        return save_figure(fig, path)
    finally:
        plt.close(fig)


def _scatter_3d(fig, spec, gaussians, shape) -> None:
    if gaussians is None:
        return
    centres, _, inten = voxel_gaussians(gaussians, shape)
    ax = fig.add_subplot(spec, projection="3d")
    ax.scatter(centres[:, 0], centres[:, 1], centres[:, 2], c=inten, cmap="plasma", s=4)
    ax.set_title("Gaussian centres (3D)", fontsize=10)



def loss_curve_png(history: torch.Tensor, path: str | Path, title: str = "pre-training loss") -> Path | None:
    """PNG of loss against step (raw and smoothed), written atomically; None if there is nothing to plot."""
    if history.numel() == 0:
        return None
    from matplotlib.figure import Figure  # lazy: matplotlib is heavy, loaded when a figure is drawn

    steps, losses = history[:, 0].numpy(), history[:, 1].numpy()
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(steps, losses, lw=0.8, alpha=0.4, label="loss")
    if len(losses) >= 5:  # bias-corrected exponential moving average
        alpha = min(0.3, max(0.005, 5.0 / len(losses)))
        ema, smooth = 0.0, []
        for t, v in enumerate(losses, start=1):
            ema = (1 - alpha) * ema + alpha * float(v)
            smooth.append(ema / (1 - (1 - alpha) ** t))
        ax.plot(steps, smooth, lw=1.5, label=f"smoothed (EMA {alpha:.3g})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    if (losses > 0).all():
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


__all__ = ["overview_png", "loss_curve_png", "save_figure", "slice_ellipses", "render_glyphs_offscreen",
           "voxel_gaussians", "PLANES"]
