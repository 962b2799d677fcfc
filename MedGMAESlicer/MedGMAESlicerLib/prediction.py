"""The module logic's prediction part: masking and predicting Gaussians on arrays, in-process or in a worker process.

:class:`PredictionLogic` is the part ``MedGMAELogic.prediction`` holds: it masks a CT array with the model's own
MAE masking, loads and caches a checkpoint, turns a CT array and the settings into a :class:`PredictionRequest`,
predicts in this process (scripts) or starts the worker (the panel), and reads back what the worker wrote. It never
touches an MRML node or a scene, so tests drive it with plain arrays.

The panel writes a :class:`PredictionRequest` (the CT array, its IJKToRAS and the settings) to a file and runs
``python -m MedGMAESlicerLib.prediction REQUEST OUTPUT`` as a background job: the torch import, the model load and
the forward pass happen in that process, which reports JSON progress lines (``medgmae_core.progress``) and can be
cancelled like training. The GUI then only turns the :class:`PredictionOutput` into nodes (``display.py``).

:func:`run_prediction` is the one place that predicts, for the worker and for scripts alike.
It calls ``medgmae_core``'s public API and nothing else: ``train.checkpoint.load_model``, ``inference.prepare_ct``,
``inference.predict_window`` / ``inference.predict_volume``, and the model's own renderer settings to draw the result.
How those functions mask the input (the inference mask policy) is theirs to decide: this module passes the user's
mask ratio (0 when "predict from the masked input" is off) and a seeded generator, never a policy, and it does not
use ``predict_volume(stitch=True)``, whose single training-style mask would bypass the policy.

This file never imports ``slicer`` (the worker runs in plain Python). torch and ``medgmae_core`` (which imports
torch) are imported inside functions: the module loads in a Slicer that has not installed them yet.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .compat import translator
from .jobs import BackgroundJob
from .parameters import MedGMAEParameters, choice_value, is_set

_ = translator()
WORKER = "MedGMAESlicerLib.prediction"  # python -m WORKER REQUEST OUTPUT
STAGES = ("loading the model", "preparing the CT", "predicting", "rendering")


class PredictionCancelled(Exception):
    """The user cancelled a running prediction."""


@dataclass
class PredictionRequest:
    """Everything a prediction needs, with no MRML node in it."""
    hu: np.ndarray  # [I, J, K] Hounsfield units
    ijk_to_ras: np.ndarray  # 4x4
    checkpoint: str = ""  # empty: the bundled demo weights
    mode: str = "point"  # "point" | "whole"
    point_ras: tuple | None = None
    mask_ratio: float = 0.0
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.mode not in ("point", "whole"):
            raise ValueError(f"window mode must be 'point' or 'whole', got {self.mode!r}")
        if self.point_ras is not None:
            self.point_ras = tuple(float(v) for v in np.asarray(self.point_ras, dtype=np.float64).reshape(3))

    def save(self, path: str | Path) -> Path:
        settings = {"checkpoint": str(self.checkpoint or ""), "mode": self.mode, "point_ras": self.point_ras,
                    "mask_ratio": float(self.mask_ratio), "seed": int(self.seed), "device": self.device}
        np.savez(path, hu=np.asarray(self.hu), ijk_to_ras=np.asarray(self.ijk_to_ras, dtype=np.float64),
                 settings=json.dumps(settings))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "PredictionRequest":
        with np.load(path) as data:
            settings = json.loads(str(data["settings"]))
            return cls(data["hu"], data["ijk_to_ras"], **settings)


@dataclass
class PredictionOutput:
    """The Gaussians (whole prepared grid, normalised coords, batch 1), the rendered prediction and its affine."""
    centres: np.ndarray  # [1, n, 3]
    scales: np.ndarray  # [1, n, 3]
    quaternions: np.ndarray  # [1, n, 4]
    intensities: np.ndarray  # [1, n]
    pred: np.ndarray  # [I, J, K] in [0, 1] (HU window)
    pred_affine: np.ndarray  # 4x4 IJKToRAS of ``pred``
    grid_shape: tuple  # the prepared CT grid the Gaussians live in
    grid_affine: np.ndarray  # its IJKToRAS
    mode: str = "point"
    checkpoint: str = ""
    windows: int = 1
    timings: dict = field(default_factory=dict)

    def gaussians(self):
        """As a ``medgmae_core.GaussianSet`` (imports torch)."""
        import torch  # lazy: the module loads without torch
        from medgmae_core import GaussianSet  # lazy: medgmae_core imports torch
        return GaussianSet(*(torch.from_numpy(np.ascontiguousarray(a)) for a in
                             (self.centres, self.scales, self.quaternions, self.intensities)))

    @classmethod
    def from_gaussians(cls, gaussians, **kwargs) -> "PredictionOutput":
        arrays = [t.detach().cpu().float().numpy() for t in
                  (gaussians.centres, gaussians.scales, gaussians.quaternions, gaussians.intensities)]
        return cls(*arrays, **kwargs)

    def save(self, path: str | Path) -> Path:
        meta = {"grid_shape": [int(n) for n in self.grid_shape], "mode": self.mode, "checkpoint": self.checkpoint,
                "windows": int(self.windows), "timings": self.timings}
        np.savez(path, centres=self.centres, scales=self.scales, quaternions=self.quaternions,
                 intensities=self.intensities, pred=self.pred, pred_affine=self.pred_affine,
                 grid_affine=self.grid_affine, meta=json.dumps(meta))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "PredictionOutput":
        with np.load(path) as data:
            meta = json.loads(str(data["meta"]))
            return cls(data["centres"], data["scales"], data["quaternions"], data["intensities"], data["pred"],
                       data["pred_affine"], tuple(meta["grid_shape"]), data["grid_affine"], meta["mode"],
                       meta["checkpoint"], meta["windows"], meta["timings"])


def resolve_device(device: str = "auto") -> str:
    """``auto``: CUDA when available, else CPU; ``cuda`` without CUDA is a clear error (imports torch).

    The one definition: the background part checks the Train and Reconstruct devices with it too."""
    import torch  # lazy: the module loads without torch
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: a GPU (CUDA) was requested but PyTorch sees none; choose Automatic or CPU")
    return device


def default_checkpoint() -> Path:
    """The bundled demo weights (``medgmae_core.train.checkpoint.BUNDLED_WEIGHTS``; demo weights, not the paper's)."""
    from medgmae_core.train.checkpoint import BUNDLED_WEIGHTS  # lazy: medgmae_core imports torch
    if not BUNDLED_WEIGHTS.is_file():
        raise FileNotFoundError(f"the bundled demo weights are missing ({BUNDLED_WEIGHTS}); choose a checkpoint file")
    return BUNDLED_WEIGHTS


def checkpoint_path(checkpoint) -> Path:
    """The checkpoint file to load: the given one, or the bundled demo weights when empty."""
    path = Path(checkpoint) if is_set(checkpoint) else default_checkpoint()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (choose a .pt file, or leave it empty for "
                                "the bundled demo weights)")
    return path


def load_gaussian_model(checkpoint, device: str = "auto"):
    """``(model, config, path)`` through ``medgmae_core.train.checkpoint.load_model``; only Gaussian models."""
    from medgmae_core.train.checkpoint import load_model  # lazy: medgmae_core imports torch
    path = checkpoint_path(checkpoint)
    model, config = load_model(path, device=resolve_device(device))
    if not config.is_gaussian:
        raise ValueError(f"checkpoint {path}: a {config.objective!r} model predicts no Gaussians; choose a "
                         "MedGMAE (gaussian / gaussian_star) checkpoint")
    return model, config, path


def run_prediction(request: PredictionRequest, *, model=None, checkpoint_label: str | None = None,
                   progress: Callable[[float, str], bool | None] | None = None) -> PredictionOutput:
    """Predict Gaussians for one window around ``request.point_ras`` (default: the volume centre) or the whole
    volume (sliding windows), with ``medgmae_core``'s own functions. ``progress(fraction, text)`` is called between
    stages and windows; a true return value stops with :class:`PredictionCancelled`."""
    timings: dict[str, float] = {}

    def report(fraction: float, text: str) -> None:
        if progress is not None and progress(fraction, text):
            raise PredictionCancelled("prediction cancelled")

    def timed(name: str):
        class _T:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timings[name] = round(time.perf_counter() - self.t0, 3)
        return _T()

    report(0.0, STAGES[0])
    with timed("import"):  # lazy (and timed): the module loads without torch; medgmae_core imports torch
        import torch
        from medgmae_core import inference, spatial
    if model is None:
        with timed("load model"):
            model, _config, path = load_gaussian_model(request.checkpoint, request.device)
        checkpoint_label = str(path)
    report(0.1, STAGES[1])
    with timed("prepare"):
        prepared = inference.prepare_ct(np.asarray(request.hu), np.asarray(request.ijk_to_ras, dtype=np.float64))
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(int(request.seed))
    report(0.15, STAGES[2])
    with timed("predict"):
        if request.mode == "point":
            window = inference.predict_window(model, prepared, centre_ras=request.point_ras,
                                              mask_ratio=request.mask_ratio, generator=generator)
            report(0.8, STAGES[3])
            with torch.no_grad():
                rendered = model.render(window.window_gaussians.to(device))
            pred = rendered[0, 0].detach().cpu().float().numpy()
            offset = np.eye(4)
            offset[:3, 3] = np.asarray(window.offset, dtype=np.float64)
            pred_affine = spatial.check_affine(prepared.ijk_to_ras) @ offset
            gaussians, windows = window.gaussians, 1
        else:
            result = inference.predict_volume(
                model, prepared, mask_ratio=request.mask_ratio, generator=generator,
                progress=lambda done, total: report(0.15 + 0.7 * done / total, f"window {done} of {total}"))
            gaussians, windows = result.gaussians, len(result.grid)
            report(0.85, STAGES[3])
            pred, pred_affine = render_on_grid(model, gaussians, prepared.shape), prepared.ijk_to_ras
    output = PredictionOutput.from_gaussians(
        gaussians, pred=np.ascontiguousarray(pred, dtype=np.float32), pred_affine=np.asarray(pred_affine, np.float64),
        grid_shape=tuple(int(n) for n in prepared.shape), grid_affine=np.asarray(prepared.ijk_to_ras, np.float64),
        mode=request.mode, checkpoint=str(checkpoint_label or request.checkpoint or ""), windows=windows,
        timings=timings)
    report(1.0, "done")
    return output


def render_on_grid(model, gaussians, shape) -> np.ndarray:
    """Merged whole-volume Gaussians drawn on the prepared grid with the model's own renderer settings
    (``ModelConfig.render_cutoff / render_convention / render_backend``, as ``model.render`` uses for one window)."""
    import torch  # lazy: the module loads without torch
    from medgmae_core.render import render_volume  # lazy: medgmae_core imports torch

    cfg = model.config
    with torch.no_grad():
        volume = render_volume(gaussians.to(torch.float32), tuple(int(n) for n in shape),
                               cutoff=getattr(cfg, "render_cutoff", 3.0),
                               convention=getattr(cfg, "render_convention", "paper"),
                               backend=getattr(cfg, "render_backend", "auto"))
    return volume[0].detach().cpu().float().numpy()


# ----------------------------------------------------------------------------- masking
def patch_mask(shape_ijk, patch_size: int, mask_ratio: float, seed: int) -> np.ndarray:
    """Random patch mask over a volume, 1 = hidden, as ``[ceil(I/p), ceil(J/p), ceil(K/p)]`` uint8.

    The same MAE masking the model uses (``medgmae_core.model.vit.random_masking``, argsort of uniform noise),
    seeded, so a seed gives the same mask here and in prediction.
    """
    import torch  # lazy: the module loads without torch
    from medgmae_core.model.vit import random_masking  # lazy: medgmae_core imports torch

    if int(patch_size) < 1:
        raise ValueError(f"patch size must be >= 1 voxel, got {patch_size}")
    grid = tuple(-(-int(n) // int(patch_size)) for n in shape_ijk)
    generator = torch.Generator().manual_seed(int(seed))
    tokens = torch.zeros(1, int(np.prod(grid)), 1)
    _mask_tokens, mask, _restore = random_masking(tokens, float(mask_ratio), generator)
    return mask.reshape(grid).to(torch.uint8).numpy()


def voxel_mask(shape_ijk, patch_mask_: np.ndarray, patch_size: int) -> np.ndarray:
    """Patch grid mask -> voxel mask of ``shape_ijk`` (cropped at the volume edge)."""
    p = int(patch_size)
    full = patch_mask_.repeat(p, 0).repeat(p, 1).repeat(p, 2)
    return np.ascontiguousarray(full[: shape_ijk[0], : shape_ijk[1], : shape_ijk[2]])


@dataclass
class MaskedVolume:
    """A CT with its hidden patches blanked: what the Mask panel previews."""
    masked: np.ndarray  # [I, J, K], hidden voxels set to ``fill_value``
    mask: np.ndarray  # [I, J, K] uint8, 1 = hidden
    fill_value: float  # the volume minimum


# ----------------------------------------------------------------------------- the prediction part
@dataclass
class PredictionJobContext:
    """A background prediction's output file and what its starter wants done with the result (the logic: the CT
    node it is for, and the keyword arguments it is shown with)."""
    output_path: Path
    volume_node: object = None
    show: dict = field(default_factory=dict)


class PredictionLogic:
    """Masking and predicting Gaussians on arrays; no MRML node, no scene (``MedGMAELogic.prediction``).

    ``loader(checkpoint, device) -> (model, config, path)`` loads a model (default :func:`load_gaussian_model`);
    the loaded model is cached per file, modification time and device. ``worker`` is the module the background
    path runs as ``python -m WORKER REQUEST OUTPUT``.
    """

    def __init__(self, *, loader: Callable = load_gaussian_model, worker: str = WORKER) -> None:
        self.loader, self.worker = loader, worker
        self.model = self.config = self.model_path = None
        self._model_key: tuple | None = None

    def mask(self, voxels: np.ndarray, *, mask_ratio: float = 0.75, patch_size: int = 12,
             seed: int = 0) -> MaskedVolume:
        """Hide a seeded random ``mask_ratio`` of the ``patch_size`` cubes of ``voxels`` (``[I, J, K]``), setting them
        to the volume minimum."""
        MedGMAEParameters.check(maskRatio=mask_ratio, patchSize=patch_size, seed=seed)  # named errors
        mask = voxel_mask(voxels.shape, patch_mask(voxels.shape, patch_size, mask_ratio, seed), patch_size)
        fill = float(voxels.min())
        masked = np.where(mask.astype(bool), np.asarray(fill, dtype=voxels.dtype), voxels)
        return MaskedVolume(masked, mask, fill)

    def load_model(self, checkpoint=None, device: str = "auto"):
        """``(model, config)`` of ``checkpoint`` (empty: the bundled demo weights) on ``device``; cached."""
        path = checkpoint_path(checkpoint)
        key = (str(path.resolve()), path.stat().st_mtime, resolve_device(choice_value(device)))
        if self._model_key != key:
            self.model, self.config, self.model_path = self.loader(path, key[2])
            self._model_key = key
        return self.model, self.config

    def request(self, hu: np.ndarray, ijk_to_ras: np.ndarray, *, checkpoint=None, mode: str = "point",
                point_ras=None, mask_ratio: float = 0.0, seed: int = 0, device: str = "auto") -> PredictionRequest:
        """A CT array (``[I, J, K]`` HU), its IJKToRAS and the settings as a :class:`PredictionRequest`; the settings
        are checked here, with errors that name the parameter."""
        mode, device = choice_value(mode), choice_value(device)
        MedGMAEParameters.check(maskRatio=mask_ratio, seed=seed, device=device, windowMode=mode)
        return PredictionRequest(np.array(hu, dtype=np.float32), np.asarray(ijk_to_ras, dtype=np.float64),
                                 checkpoint=str(checkpoint) if is_set(checkpoint) else "", mode=mode,
                                 point_ras=point_ras, mask_ratio=mask_ratio, seed=seed, device=device)

    def predict(self, request: PredictionRequest, *, model=None,
                progress: Callable[[float, str], bool | None] | None = None) -> PredictionOutput:
        """Predict in this process with ``model``, or else the (cached) model of the request's checkpoint and device.
        ``progress`` as for :func:`run_prediction` (a true return value cancels)."""
        label = load_seconds = None
        if model is None:
            t0 = time.perf_counter()
            model, _config = self.load_model(request.checkpoint, request.device)
            label, load_seconds = str(self.model_path), time.perf_counter() - t0
        output = run_prediction(request, model=model, checkpoint_label=label, progress=progress)
        if load_seconds is not None:
            output.timings["load model"] = round(load_seconds, 3)
        return output

    def start_job(self, request: PredictionRequest, *, volume_node=None, show: dict | None = None,
                  start: bool = True) -> BackgroundJob:
        """Predict in a background process: the request goes to a temporary folder, the worker writes its output
        there. ``job.context`` is a :class:`PredictionJobContext` (with ``volume_node`` and ``show`` as given)."""
        folder = Path(tempfile.mkdtemp(prefix="medgmae_predict_"))
        request_path, output_path = request.save(folder / "request.npz"), folder / "output.npz"
        job = BackgroundJob.module(self.worker, str(request_path), str(output_path), name=_("prediction"),
                                   cwd=str(folder))
        job.context = PredictionJobContext(output_path, volume_node, dict(show or {}))
        return job.start() if start else job

    def job_output(self, job: BackgroundJob) -> PredictionOutput:
        """What a finished job's worker wrote."""
        return PredictionOutput.load(job.context.output_path)

    def discard(self, job: BackgroundJob) -> None:
        """Remove a prediction job's temporary folder (after showing it, or when it was cancelled or failed)."""
        ctx = getattr(job, "context", None)
        if isinstance(ctx, PredictionJobContext):
            shutil.rmtree(ctx.output_path.parent, ignore_errors=True)


# ----------------------------------------------------------------------------- the worker process
def main(argv: list[str] | None = None) -> int:
    """``python -m MedGMAESlicerLib.prediction REQUEST OUTPUT``: JSON progress lines on stdout; exit 0 on success,
    2 for bad inputs (the message in an ``error`` event), 1 otherwise."""
    parser = argparse.ArgumentParser(prog="MedGMAESlicerLib.prediction", description=__doc__.splitlines()[0])
    parser.add_argument("request", help="request file written by PredictionRequest.save (.npz)")
    parser.add_argument("output", help="output file for PredictionOutput.save (.npz)")
    args = parser.parse_args(argv)

    def emit(event: str, **fields) -> None:
        print(json.dumps({"event": event, "command": "predict", **fields}), flush=True)

    total = 1000
    emit("start", total=total)
    try:
        request = PredictionRequest.load(args.request)
        output = run_prediction(request, progress=lambda f, text: emit(
            "progress", step=int(round(total * f)), total=total, stage=text))
        output.save(args.output)
    except (FileNotFoundError, ValueError) as exc:
        emit("error", message=str(exc))
        return 2
    except Exception as exc:  # noqa: BLE001 - reported to the panel, with the traceback on stderr
        traceback.print_exc()
        emit("error", message=f"{type(exc).__name__}: {exc}")
        return 1
    emit("done", output=str(args.output), gaussians=int(output.intensities.size), timings=output.timings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
