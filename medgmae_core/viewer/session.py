"""The viewer's logic, without any web code: load an input, predict, threshold, pick, draw slices, export.

:class:`ViewerSession` holds one input on the display grid (the CT prepared like the model's inputs: RAS,
``spacing_mm``, HU window [-175, 250] -> [0, 1], via ``inference.prepare_ct``) and, when there are any, its
Gaussians in world coordinates (RAS mm centres and 1-sigma axes, as ``spatial.gaussians_to_world`` gives them).
Everything drawn reuses the code the demo's ``.mrb`` and PNG use: ``export.glyphs.gaussian_glyph_polydata`` for
the 3D ellipsoids, ``export.figures.voxel_gaussians`` / ``slice_ellipses`` for the 2D outlines, ``export.ply``,
``export.nifti`` and ``export.slicer_scene`` for the exports. Prediction calls the library's public functions
(``train.checkpoint.load_model``, ``inference.predict_volume``) exactly like ``medgmae demo``.

Inputs (:meth:`ViewerSession.load`):

* ``None``: the built-in procedural phantom (``data.phantom.make_phantom``);
* a CT file (NIfTI, NRRD/MHA) or a DICOM folder, read with the one reader (``data.readers.read_ct``);
* an output folder of ``medgmae demo`` / ``fit`` / ``reconstruct`` (it holds ``gaussians.ply``): its Gaussians
  over its CT (the demo's ``scene.mrb`` CT node) or its volume (the first of :data:`OUTPUT_VOLUMES`; a volume not in
  HU, such as an attenuation reconstruction, is shown between its 0.5th and 99.5th percentiles);
* a Gaussian PLY: its Gaussians over their own render on the grid the PLY records.
"""
from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import inference, spatial  # inference.predict_volume is looked up when called (tests spy on it)
from ..data.phantom import make_phantom
from ..data.readers import read_ct, read_image
from ..data.transforms import HU_WINDOW, NotCTError, ct_intensity_problem
from ..export import nifti, ply, slicer_scene
from ..export.figures import PLANES as FIG_PLANES, slice_ellipses, voxel_gaussians
from ..export.glyphs import gaussian_glyph_polydata
from ..export.ply import read_gaussians_ply
from ..export.slicer_scene import node_ijk_to_ras, read_scene, volume_array
from ..gaussians import GaussianSet
from ..inference import PreparedCT, prepare_ct
from ..render import render_volume
from ..train.checkpoint import WEIGHTS_DIR, bundled_weights, load_model

PLANES = ("axial", "coronal", "sagittal")
OUTPUT_VOLUMES = ("fit.nii.gz", "reconstruction_hu.nii.gz", "reconstruction.nii.gz", "prediction.nii.gz")
EXPORT_NAMES = {"ply": "gaussians.ply", "nifti": "prediction.nii.gz", "mrb": "scene.mrb"}


@dataclass
class WorldGaussians:
    """Gaussians in RAS mm: centres ``[n, 3]``, 1-sigma axes ``[n, 3, 3]`` (columns) and intensities ``[n]``."""

    centres: np.ndarray
    axes: np.ndarray
    intensities: np.ndarray

    def __len__(self) -> int:
        return len(self.centres)

    @property
    def sigmas_mm(self) -> np.ndarray:
        """``[n, 3]`` the three 1-sigma semi-axis lengths in mm."""
        return np.linalg.norm(self.axes, axis=1)

    @property
    def size_mm(self) -> np.ndarray:
        """``[n]`` the largest 1-sigma semi-axis in mm (what the size threshold compares)."""
        return self.sigmas_mm.max(axis=1) if len(self) else np.zeros(0)

    @classmethod
    def from_set(cls, gaussians: GaussianSet, shape, ijk_to_ras) -> "WorldGaussians":
        centres, axes = spatial.gaussians_to_world(gaussians, shape, ijk_to_ras)
        return cls(np.asarray(centres, np.float64).reshape(-1, 3), np.asarray(axes, np.float64).reshape(-1, 3, 3),
                   gaussians.intensities.detach().cpu().double().reshape(-1).numpy())

    def to_set(self, shape, ijk_to_ras, keep: np.ndarray | None = None) -> GaussianSet:
        """On the normalised coords of a grid (``keep``: the indices to include)."""
        idx = np.arange(len(self)) if keep is None else np.asarray(keep)
        return spatial.world_to_gaussians(self.centres[idx], self.axes[idx], self.intensities[idx], shape, ijk_to_ras)


@dataclass
class Thresholds:
    """Which Gaussians are drawn: intensity >= ``min_intensity`` and ``min_size_mm`` <= size <= ``max_size_mm``."""

    min_intensity: float | None = None
    min_size_mm: float | None = None
    max_size_mm: float | None = None

    def keep(self, g: WorldGaussians) -> np.ndarray:
        ok = np.ones(len(g), dtype=bool)
        if self.min_intensity is not None:
            ok &= g.intensities >= self.min_intensity
        size = g.size_mm
        if self.min_size_mm is not None:
            ok &= size >= self.min_size_mm
        if self.max_size_mm is not None:
            ok &= size <= self.max_size_mm
        return np.flatnonzero(ok)


@dataclass
class PredictionInfo:
    weights: str
    mask_ratio: float
    gaussians: int
    windows: int
    seconds: float


class ViewerSession:
    """One input and its Gaussians on the display grid (module docstring). Not thread-safe by itself: the UI
    runs :meth:`predict` in a worker (:class:`PredictJob`) and swaps the result in under ``lock``."""

    def __init__(self, *, spacing_mm: float = 1.5, glyph_sigma: float = 2.0,
                 phantom_shape: tuple[int, int, int] = (128, 128, 96), seed: int = 0) -> None:
        self.spacing_mm = float(spacing_mm)
        self.glyph_sigma = float(glyph_sigma)
        self.phantom_shape = tuple(int(n) for n in phantom_shape)
        self.seed = int(seed)
        self.lock = threading.RLock()
        self.source = ""
        self.kind = ""
        self.hu: np.ndarray | None = None
        self.affine: np.ndarray | None = None
        self.prepared = None  # inference.PreparedCT
        self.gaussians: WorldGaussians | None = None
        self.prediction: torch.Tensor | None = None  # windowed [D, H, W] on the display grid
        self.mask: torch.Tensor | None = None
        self.last_prediction: PredictionInfo | None = None
        self.thresholds = Thresholds()

    # ------------------------------------------------------------------ loading
    @property
    def loaded(self) -> bool:
        return self.prepared is not None

    def load(self, source: str | Path | None) -> "ViewerSession":
        """Load an input (module docstring). On any error the session keeps what it had and the error propagates."""
        gaussians = None
        if source is None or str(source).strip() == "":
            ph = make_phantom(shape=self.phantom_shape, seed=self.seed)
            hu, affine = ph.hu, np.asarray(ph.affine, dtype=np.float64)
            kind, name = "phantom", f"built-in phantom (seed {self.seed})"
        else:
            path = Path(str(source).strip()).expanduser()
            name = str(path)
            if not path.exists():
                raise FileNotFoundError(f"input not found: {path}")
            if path.is_file() and path.suffix.lower() == ".ply":
                ply = read_gaussians_ply(path)
                shape = ply.shape or (96, 96, 96)
                affine = ply.ijk_to_ras if ply.ijk_to_ras is not None else np.diag([self.spacing_mm] * 3 + [1.0])
                gaussians = WorldGaussians.from_set(ply.gaussians, shape, affine)
                volume = self._render(ply.gaussians, shape)
                prepared = PreparedCT(volume, np.asarray(affine, np.float64), tuple(shape), np.asarray(affine))
                self._set(name, "Gaussian PLY", None, np.asarray(affine, np.float64), prepared, gaussians)
                return self
            if path.is_dir() and (path / "gaussians.ply").is_file():
                kind = "output folder"
                hu, affine, hu_units = self._output_folder_volume(path)
                ply = read_gaussians_ply(path / "gaussians.ply")
                if ply.coords != "ras" and ply.ijk_to_ras is None:
                    raise ValueError(f"{path / 'gaussians.ply'}: Gaussians without a world grid")
                gaussians = WorldGaussians.from_set(ply.gaussians, ply.shape, ply.ijk_to_ras)
                if not hu_units:
                    lo, hi = np.percentile(hu, [0.5, 99.5])
                    hu = -175.0 + (hu - lo) / max(hi - lo, 1e-9) * 425.0
            else:
                kind = "CT"
                hu, affine = read_ct(path, what="CT")
        try:
            prepared = prepare_ct(hu, affine, spacing_mm=self.spacing_mm)
        except NotCTError as exc:
            raise NotCTError(f"{name}: not a CT ({exc})") from None
        self._set(name, kind, np.asarray(hu), np.asarray(affine, np.float64), prepared, gaussians)
        return self

    def _set(self, source, kind, hu, affine, prepared, gaussians) -> None:
        with self.lock:
            self.source, self.kind, self.hu, self.affine, self.prepared = source, kind, hu, affine, prepared
            self.gaussians, self.prediction, self.mask, self.last_prediction = gaussians, None, None, None
            self.thresholds = Thresholds()

    @staticmethod
    def _render(gaussians: GaussianSet, shape) -> torch.Tensor:
        vol = render_volume(gaussians.detach().to(torch.float32), tuple(shape))[0]
        top = float(torch.quantile(vol.flatten()[:: max(1, vol.numel() // 200_000)], 0.999)) if vol.numel() else 1.0
        return (vol / top).clamp(0, 1) if top > 1.0 else vol.clamp(0, 1)

    @staticmethod
    def _output_folder_volume(folder: Path) -> tuple[np.ndarray, np.ndarray, bool]:
        """``(array, affine, in_hu)``: the demo's CT from ``scene.mrb``, else the folder's volume."""
        if (folder / "scene.mrb").is_file():
            hs = read_scene(folder / "scene.mrb")
            node = hs.scene.GetFirstNodeByName("CT")
            if node is not None:
                return volume_array(node).astype(np.float32), node_ijk_to_ras(node), True
        for name in OUTPUT_VOLUMES:
            if (folder / name).is_file():
                arr, affine = read_image(folder / name, what="volume")
                return arr.astype(np.float32), affine, not ct_intensity_problem(arr)
        raise ValueError(f"{folder}: an output folder with gaussians.ply but no scene.mrb or "
                         f"{', '.join(OUTPUT_VOLUMES)}")

    def _require(self) -> None:
        if not self.loaded:
            raise ValueError("nothing is loaded")

    # ------------------------------------------------------------------ predicting
    def predict(self, *, mask_ratio: float = 0.75, weights: str | Path | None = None, seed: int = 0,
                progress: Callable[[int, int], None] | None = None) -> PredictionInfo:
        """Mask the display-grid CT at ``mask_ratio`` and predict its Gaussians, window by window, with the
        checkpoint ``weights`` (default: :func:`bundled_weights`), like ``medgmae demo``."""
        self._require()
        if not 0.0 <= float(mask_ratio) < 1.0:
            raise ValueError(f"mask ratio must be in [0, 1), got {mask_ratio}")
        path = Path(str(weights)).expanduser() if weights else bundled_weights()
        if path is None:
            raise FileNotFoundError(f"no bundled weights in {WEIGHTS_DIR}; choose a checkpoint")
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        t0 = time.perf_counter()
        model, config = load_model(path, needed_by="`medgmae view`")
        if not config.is_gaussian:
            raise ValueError(f"{path}: the viewer needs a Gaussian model, this checkpoint is {config.objective!r}")
        prepared = self.prepared
        generator = torch.Generator().manual_seed(int(seed))
        result = inference.predict_volume(model, prepared, overlap=0, pad_last=True, mask_ratio=float(mask_ratio),
                                          stitch=True, generator=generator, progress=progress)
        world = WorldGaussians.from_set(result.gaussians, prepared.shape, prepared.ijk_to_ras)
        info = PredictionInfo(str(path), float(mask_ratio), len(world), len(result.grid), time.perf_counter() - t0)
        with self.lock:
            if self.prepared is prepared:  # the input was not replaced meanwhile
                self.gaussians, self.prediction, self.mask = world, result.pred.clamp(0, 1), result.mask
                self.last_prediction = info
                self.thresholds = Thresholds()
        return info

    # ------------------------------------------------------------------ thresholds, picking
    def visible(self) -> np.ndarray:
        """Indices of the Gaussians the thresholds keep."""
        if self.gaussians is None:
            return np.zeros(0, dtype=np.int64)
        return self.thresholds.keep(self.gaussians)

    def ranges(self) -> dict[str, tuple[float, float]]:
        """Intensity and size (mm) ranges of the Gaussians, for the threshold sliders."""
        g = self.gaussians
        if g is None or not len(g):
            return {"intensity": (0.0, 1.0), "size": (0.0, 10.0)}
        return {"intensity": (float(g.intensities.min()), float(g.intensities.max())),
                "size": (float(g.size_mm.min()), float(g.size_mm.max()))}

    def glyph_polydata(self):
        """``(vtkPolyData, indices)``: the visible Gaussians' ``glyph_sigma`` ellipsoids (RAS, ``intensity``
        point scalars) and which Gaussian each glyph is (glyph ``j`` = cells ``j*t .. (j+1)*t-1``)."""
        keep = self.visible()
        g = self.gaussians
        if g is None:
            return gaussian_glyph_polydata(np.zeros((0, 3)), np.zeros((0, 3, 3)), np.zeros(0)), keep
        return gaussian_glyph_polydata(g.centres[keep], g.axes[keep], g.intensities[keep],
                                       sigma=self.glyph_sigma), keep

    def gaussian_info(self, index: int) -> dict:
        """The parameters of Gaussian ``index``: centre (RAS mm), 1-sigma semi-axes (mm), intensity, axes."""
        g = self.gaussians
        if g is None or not 0 <= int(index) < len(g):
            raise IndexError(f"no Gaussian {index} (there are {0 if g is None else len(g)})")
        i = int(index)
        sig = g.sigmas_mm[i]
        dirs = g.axes[i] / np.maximum(sig, 1e-12)[None, :]
        return {"index": i, "centre_ras_mm": [round(float(v), 2) for v in g.centres[i]],
                "sigmas_mm": [round(float(v), 3) for v in sig], "intensity": round(float(g.intensities[i]), 4),
                "axes": [[round(float(v), 3) for v in dirs[:, c]] for c in range(3)]}

    def nearest(self, point_ras, among: np.ndarray | None = None) -> int:
        """The Gaussian (of ``among``, default the visible ones) whose centre is nearest ``point_ras``."""
        idx = self.visible() if among is None else np.asarray(among)
        if self.gaussians is None or not len(idx):
            raise IndexError("no Gaussians to pick")
        d = np.linalg.norm(self.gaussians.centres[idx] - np.asarray(point_ras, np.float64)[None], axis=1)
        return int(idx[int(np.argmin(d))])

    # ------------------------------------------------------------------ 2D slices
    def slice_index(self, plane: str, fraction: float = 0.5) -> int:
        n = self.prepared.shape[FIG_PLANES[plane][0]]
        return int(round(min(max(fraction, 0.0), 1.0) * (n - 1)))

    def slice_png(self, plane: str, fraction: float = 0.5, *, size_px: int = 300, max_outlines: int = 400,
                  prediction: bool = False) -> bytes:
        """PNG of one slice of the display CT (``prediction=True``: of the prediction, when there is one) with the
        visible Gaussians' ``glyph_sigma`` outlines (``figures.slice_ellipses``), radiological like the demo PNG."""
        import matplotlib  # lazy: matplotlib is heavy; the Agg backend is chosen before any drawing

        matplotlib.use("Agg", force=False)
        # lazy: as above, after the Agg choice
        from matplotlib.collections import EllipseCollection
        from matplotlib.figure import Figure

        self._require()
        with self.lock:
            prepared, gaussians, keep = self.prepared, self.gaussians, self.visible()
            volume = (self.prediction if prediction and self.prediction is not None else prepared.volume).numpy()
        axis, (h_ax, v_ax) = FIG_PLANES[plane]
        index = self.slice_index(plane, fraction)
        image = np.take(volume, index, axis=axis)
        spacing = spatial.spacing_of(prepared.ijk_to_ras)
        h, v = image.shape
        fig = Figure(figsize=(size_px / 100, size_px / 100), dpi=100)
        ax = fig.add_axes((0, 0, 1, 1))
        ax.imshow(image.T, origin="lower", cmap="gray", vmin=0, vmax=1, extent=(-0.5, h - 0.5, -0.5, v - 0.5),
                  aspect=spacing[v_ax] / spacing[h_ax], interpolation="nearest")
        if gaussians is not None and len(keep):
            order = keep[np.argsort(-gaussians.intensities[keep])[:max_outlines]]
            gs = gaussians.to_set(prepared.shape, prepared.ijk_to_ras, order)
            centres, cov, inten = voxel_gaussians(gs, prepared.shape)
            cut, centre, widths, heights, angles = slice_ellipses(centres, cov, axis, index, self.glyph_sigma)
            if cut.any():
                import matplotlib.pyplot as plt  # lazy: as above

                lo, hi = float(inten.min()), float(inten.max()) + 1e-9
                ax.add_collection(EllipseCollection(
                    widths, heights, angles, units="xy", offsets=centre, offset_transform=ax.transData,
                    facecolors="none", edgecolors=plt.get_cmap("plasma")((inten[cut] - lo) / (hi - lo)),
                    linewidths=0.8), autolim=False)
        ax.set_xlim((h - 0.5, -0.5) if plane in ("axial", "coronal") else (-0.5, h - 0.5))
        ax.set_ylim(-0.5, v - 0.5)
        ax.set_axis_off()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", facecolor="black")
        return buf.getvalue()

    # ------------------------------------------------------------------ export
    def export(self, kind: str, out_dir: str | Path) -> Path:
        """Write ``gaussians.ply`` (``ply``), ``prediction.nii.gz`` (``nifti``: the prediction, else the
        Gaussians' render, in HU on the display grid) or ``scene.mrb`` (``mrb``: CT, prediction and the visible
        glyphs) into ``out_dir``; returns the file."""
        self._require()
        if kind not in EXPORT_NAMES:
            raise ValueError(f"export kind must be one of {sorted(EXPORT_NAMES)}, got {kind!r}")
        if kind == "ply" and self.gaussians is None:
            raise ValueError("no Gaussians to export yet: press Predict first")
        if kind == "nifti" and self.prediction is None and self.gaussians is None:
            raise ValueError("no prediction to export yet: press Predict first")
        out = Path(out_dir).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        path = out / EXPORT_NAMES[kind]
        prepared = self.prepared
        if kind == "ply":
            gs = self.gaussians.to_set(prepared.shape, prepared.ijk_to_ras)
            return ply.write_gaussians_ply(path, gs, shape=prepared.shape, ijk_to_ras=prepared.ijk_to_ras)
        lo, hi = HU_WINDOW
        pred = self.prediction
        if pred is None and self.gaussians is not None:
            pred = self._render(self.gaussians.to_set(prepared.shape, prepared.ijk_to_ras), prepared.shape)
        if kind == "nifti":
            return nifti.write_volume(path, (lo + pred * (hi - lo)).numpy(), prepared.ijk_to_ras)
        ct = (lo + prepared.volume * (hi - lo)).numpy()
        poly, _ = self.glyph_polydata()
        return slicer_scene.write_scene(
            path, ct=(ct, prepared.ijk_to_ras),
            prediction=None if pred is None else ((lo + pred * (hi - lo)).numpy(), prepared.ijk_to_ras),
            mask=None if self.mask is None else (self.mask.numpy().astype(np.uint8), prepared.ijk_to_ras),
            glyphs=poly if poly.GetNumberOfPoints() else None)


@dataclass
class PredictJob:
    """Runs :meth:`ViewerSession.predict` on a worker thread; ``fraction`` / ``message`` / ``error`` for the UI."""

    session: ViewerSession
    mask_ratio: float = 0.75
    weights: str | None = None
    seed: int = 0
    on_done: Callable[["PredictJob"], None] | None = None
    fraction: float = 0.0
    message: str = "waiting"
    error: str | None = None
    info: PredictionInfo | None = None
    thread: threading.Thread | None = field(default=None, repr=False)

    def start(self) -> "PredictJob":
        self.thread = threading.Thread(target=self.run, name="medgmae-view-predict", daemon=True)
        self.thread.start()
        return self

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def _progress(self, done: int, total: int) -> None:
        self.fraction = done / max(total, 1)
        self.message = f"window {done} / {total}"

    def run(self) -> None:
        """Predict on the calling thread (``start`` runs this on a worker)."""
        self.message = "loading the checkpoint"
        try:
            self.info = self.session.predict(mask_ratio=self.mask_ratio, weights=self.weights, seed=self.seed,
                                             progress=self._progress)
            self.fraction, self.message = 1.0, f"{self.info.gaussians} Gaussians in {self.info.seconds:.1f} s"
        except Exception as exc:  # shown in the page; the server keeps running
            self.error = error_text(exc)
            self.message = "failed"
        finally:
            if self.on_done is not None:
                self.on_done(self)

    def wait(self, timeout: float | None = None) -> "PredictJob":
        if self.thread is not None:
            self.thread.join(timeout)
        return self


def error_text(exc: BaseException) -> str:
    """One line for the page: the message, or the exception type when it has none."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, FileNotFoundError) and exc.filename and str(exc.filename) not in text:
        text = f"{text}: {exc.filename}"
    return text
