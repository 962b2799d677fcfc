"""``medgmae reconstruct``: 3DGR-CT Gaussian reconstruction from X-ray projections.

Input is either a CT volume (``.nii``/``.nii.gz``/``.nrrd``/``.mha``, HU), from
which a scan is simulated (``--geometry``, ``--views``, ``--noise``), or
projection data (``.npz``/``.h5``, see ``medgmae_core.recon.projection_file``; APS
data-exchange HDF5 such as the tomopy tooth is recognised, ``recon.data_exchange``). The pipeline:
FBP/FDK -> initial Gaussians (``--init``) -> intensity calibration -> 3DGR-CT fit.

Outputs in ``--out``: ``reconstruction.nii.gz`` (attenuation, 1/mm, on the
input's grid; plus ``reconstruction_hu.nii.gz`` when the units are known),
``fbp.nii.gz``, ``gaussians.ply``, ``metrics.json`` (with progress against
the analytic baseline: iterations and seconds to FDK, FDK + 2 dB, FDK + 4 dB,
30 and 35 dB), ``comparison.png`` (FDK, Gaussians and, when known, the ground
truth side by side, each PSNR in its title), ``reconstruction.png``
(PSNR curve and slices side by side) and ``recon_checkpoint.pt`` (for
``--resume``). Progress goes to stdout as JSON lines with ``--progress-json``.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.readers import VOLUME_SUFFIXES
from ..errors import describe, make_output_dir
from ..export.figures import save_figure
from ..export.nifti import write_volume
from ..export.ply import write_gaussians_ply
from .options import add_option, add_resume
from ..progress import ProgressReporter, json_plain
from ..recon.data_exchange import is_data_exchange
from ..recon.fit import FitConfig, GaussianParams, GeometryProjector, ReconstructionFit
from ..recon.initialisation import (DEFAULT_RESIDUAL_FIT_ITERS, INIT_METHODS, analytic_reconstruction,
                                    default_max_intensity, initialise_calibrated)
from ..recon.metrics import progress_against_baseline, psnr, ssim
from ..recon.projection_data import H5_SUFFIXES, NPZ_SUFFIXES, ProjectionData
from ..recon.projection_file import load_projections, save_projections
from ..recon.simulation import mu_to_hu, simulate_from_ct
from ..train.checkpoint import WEIGHTS_DIR, atomic_torch_save, bundled_weights
from ..xray.fbp import FILTERS

CHECKPOINT_NAME = "recon_checkpoint.pt"
PROJECTION_SUFFIXES = NPZ_SUFFIXES + H5_SUFFIXES


# ------------------------------------------------------------------ pieces
def is_volume_path(path: Path) -> bool:
    return path.name.lower().endswith(VOLUME_SUFFIXES) or path.is_dir()


def load_input(args) -> ProjectionData:
    path = Path(args.input)
    if not path.exists():
        raise FileNotFoundError(f"input not found: {path}")
    if is_volume_path(path):
        options = {}
        if args.sod is not None:
            options["source_to_origin"] = args.sod
        if args.sdd is not None:
            options["source_to_detector"] = args.sdd
        if options and args.geometry != "cone":
            raise ValueError("--sod/--sdd only apply to --geometry cone")
        return simulate_from_ct(path, crop=args.crop, downsample=args.downsample, geometry=args.geometry,
                                views=args.views, noise_i0=args.noise, seed=args.seed, **options)
    if path.name.lower().endswith(PROJECTION_SUFFIXES):
        if is_data_exchange(path):
            return load_projections(path, centre=args.centre, bin_cols=args.bin_cols, pixel_size_mm=args.pixel_size,
                                    grid_size=args.grid_size)
        return load_projections(path)
    raise ValueError(f"{path}: unknown input type; give a CT volume ({', '.join(VOLUME_SUFFIXES)}) or projections "
                     f"({', '.join(PROJECTION_SUFFIXES)})")


def resolve_checkpoint(args) -> Path | None:
    if args.init not in ("medgmae", "medgmae*"):
        return None
    if args.checkpoint:
        path = Path(args.checkpoint)
        if not path.exists():
            raise FileNotFoundError(f"--checkpoint not found: {path}")
        return path
    bundled = bundled_weights(star=args.init == "medgmae*")
    if bundled is not None:
        return bundled
    raise ValueError(f"--init {args.init} needs --checkpoint PATH (no bundled weights in {WEIGHTS_DIR})")


# ---------------------------------------------------------------- outputs
def save_volume(path: Path, volume: torch.Tensor, affine: np.ndarray) -> Path:
    return write_volume(path, volume.detach().cpu().float(), affine, kind="prediction")


def save_progress_figure(path: Path, *, history: list[dict], slices: dict[str, torch.Tensor], title: str) -> Path:
    """PSNR (or loss) against iteration, and the middle slice along the rotation axis of each volume."""
    from matplotlib.figure import Figure  # lazy: matplotlib is heavy; no pyplot: never touches the global backend

    n = len(slices)
    fig = Figure(figsize=(3.2 * (n + 1), 3.4))
    axes = fig.subplots(1, n + 1)
    its = [h["iteration"] for h in history]
    if any("psnr" in h for h in history):
        axes[0].plot(its, [h.get("psnr", np.nan) for h in history], marker=".")
        for target in (30, 35):
            axes[0].axhline(target, color="grey", lw=0.6, ls="--")
        axes[0].set_ylabel("PSNR (dB)")
    else:
        axes[0].semilogy(its[1:], [h["loss"] for h in history[1:]], marker=".")
        axes[0].set_ylabel("projection loss")
    axes[0].set_xlabel("iteration")
    axes[0].set_title(title, fontsize=9)
    ref = next(iter(slices.values()))
    lo, hi = float(ref.min()), float(torch.quantile(ref.flatten().float(), 0.999))
    for ax, (name, img) in zip(axes[1:], slices.items()):
        ax.imshow(img.T.cpu().numpy(), cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, origin="lower")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def save_comparison(path: Path, *, analytic: torch.Tensor, gaussians: torch.Tensor, reference: torch.Tensor | None,
                    analytic_name: str = "FDK", iterations: int = 0, data_range: float | None = None) -> Path:
    """Side by side, on one grey scale: the analytic reconstruction, the Gaussian one and (when known) the ground
    truth, each with its PSNR in the title. Two rows: the middle slice across the rotation axis and along it."""
    from matplotlib.figure import Figure  # lazy: matplotlib is heavy, loaded when a figure is drawn

    vols = {analytic_name: analytic.detach().float().cpu(),
            f"Gaussians ({iterations} it)": gaussians.detach().float().cpu()}
    if reference is not None:
        vols["ground truth"] = reference.detach().float().cpu()
    ref = vols.get("ground truth", vols[analytic_name])
    lo, hi = float(ref.min()), float(torch.quantile(ref.flatten()[:: max(1, ref.numel() // 1_000_000)], 0.999))
    hi = hi if hi > lo else lo + 1
    fig = Figure(figsize=(3.3 * len(vols), 6.6))
    axes = fig.subplots(2, len(vols), squeeze=False)
    for col, (name, vol) in enumerate(vols.items()):
        title = name
        if reference is not None and name != "ground truth":
            title += f"\nPSNR {psnr(vol, vols['ground truth'], data_range):.2f} dB"
        for row, img in enumerate((vol[:, :, vol.shape[2] // 2], vol[:, vol.shape[1] // 2, :])):
            ax = axes[row, col]
            ax.imshow(img.T.numpy(), cmap="gray", vmin=lo, vmax=hi, origin="lower")
            ax.axis("off")
            if row == 0:
                ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def mid_slice(volume: torch.Tensor) -> torch.Tensor:
    """The middle slice across the rotation axis (volume axis 2), ``[D, H]``."""
    return volume[:, :, volume.shape[2] // 2]


# ------------------------------------------------------------------- main
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="CT volume (HU) to simulate a scan from, or projections (.npz/.h5, "
                                      "incl. APS data-exchange)")
    parser.add_argument("--out", required=True, help="output folder")
    sim = parser.add_argument_group("simulation (CT volume input)")
    sim.add_argument("--geometry", choices=("parallel", "cone"), default="parallel")
    sim.add_argument("--views", type=int, default=60, help="number of views (parallel: over 180 deg, cone: 360)")
    sim.add_argument("--noise", type=float, default=None, metavar="I0",
                     help="Poisson noise with I0 photons per unattenuated pixel (default: noiseless)")
    sim.add_argument("--sod", type=float, default=None, help="cone: source-to-rotation-axis distance, mm")
    sim.add_argument("--sdd", type=float, default=None, help="cone: source-to-detector distance, mm")
    sim.add_argument("--crop", default=None, help="crop the CT first: 'i0:i1,j0:j1,k0:k1' (voxels)")
    sim.add_argument("--downsample", type=int, default=1, help="block-average the CT by this factor")
    sim.add_argument("--save-projections", default=None, help="also write the simulated scan (.npz/.h5)")
    real = parser.add_argument_group("data-exchange input (e.g. the tomopy tooth)")
    real.add_argument("--centre", default="auto", help="rotation-axis column of the raw detector, or 'auto'")
    real.add_argument("--bin-cols", type=int, default=1, help="average this many detector columns")
    real.add_argument("--pixel-size", type=float, default=1.0, help="detector pixel pitch, mm")
    real.add_argument("--grid-size", type=int, default=None, help="in-plane voxels of the reconstruction grid")
    rec = parser.add_argument_group("reconstruction")
    rec.add_argument("--init", choices=INIT_METHODS, default="fbp")
    rec.add_argument("--checkpoint", default=None, help="MedGMAE(*) checkpoint for --init medgmae/medgmae* "
                                                        "(default: the bundled weights)")
    add_option(rec, "--spacing-mm", "--model-spacing", type=float, default=1.5,
                     help="medgmae init: resample the FBP to this spacing (mm) for the model; 0 = keep the grid")
    rec.add_argument("--overlap", type=int, default=None,
                     help="medgmae init: overlap of the model windows in voxels (default a quarter window)")
    rec.add_argument("--num-gaussians", type=int, default=None,
                     help="initial count: random/fbp (default 20000), 3dgr (default 50000, 3DGR-CT's), or for "
                          "medgmae/medgmae* the predicted plus the residual set (default 20000 in all)")
    rec.add_argument("--residual-fit-iters", type=int, default=DEFAULT_RESIDUAL_FIT_ITERS,
                     help="medgmae init: image-domain steps fitting the residual set (offset + clipped content)")
    rec.add_argument("--filter", choices=FILTERS, default="ram-lak", help="FBP/FDK filter")
    rec.add_argument("--iters", type=int, default=1500,
                     help="fit iterations (the measured +4 dB setting; about 20-40 min at 96^3 on one CPU thread)")
    rec.add_argument("--lr-horizon", type=int, default=FitConfig.lr_horizon,
                     help="iterations over which the xyz learning rate decays 2e-3 -> 2e-6 (3DGR-CT: 30000), "
                          "independent of --iters")
    rec.add_argument("--views-per-iter", type=int, default=10,
                     help="random views per iteration (default 10; 0 = all)")
    rec.add_argument("--eval-every", type=int, default=25)
    rec.add_argument("--densify-every", type=int, default=100)
    rec.add_argument("--grad-threshold", type=float, default=FitConfig.grad_threshold,
                     help="absolute densify threshold on the mean position-gradient norm (3DGS's 2e-4)")
    rec.add_argument("--densify-fraction", type=float, default=FitConfig.densify_fraction,
                     help="relative densify criterion: the top fraction by position gradient, every round")
    rec.add_argument("--max-gaussians", type=int, default=300_000)
    rec.add_argument("--tv", type=float, default=0.0, help="weight of TV on random sub-volumes (0 = off)")
    rec.add_argument("--max-intensity", type=float, default=None,
                     help="intensity bound of a Gaussian (default 2 x the FBP's 99.9th percentile)")
    rec.add_argument("--checkpoint-every", type=int, default=100, help="iterations between resume checkpoints")
    add_resume(rec, help=f"auto (continue OUT/{CHECKPOINT_NAME} if it exists, else start; also a bare --resume) "
                         "or a reconstruction checkpoint PATH")
    rec.add_argument("--seed", type=int, default=0)
    rec.add_argument("--device", default="cpu")
    parser.add_argument("--progress-json", action="store_true", help="JSON progress lines on stdout")


@dataclass
class Prepared:
    fbp: torch.Tensor
    params: GaussianParams
    info: dict  # fbp_seconds, init_seconds, intensity_gain, init_psnr ...


def prepare(args, data: ProjectionData, device: torch.device, resume_state: dict | None) -> Prepared:
    """FBP/FDK, then (unless resuming) the initial Gaussians, calibrated to the projections."""
    t0 = time.perf_counter()
    fbp = analytic_reconstruction(data, args.filter).to(device)
    info = {"fbp_seconds": time.perf_counter() - t0}
    if resume_state is not None:
        info.update(resume_state.get("extra", {}))
        return Prepared(fbp, GaussianParams.from_state_dict(resume_state["params"]), info)
    max_intensity = args.max_intensity or default_max_intensity(fbp)
    project = GeometryProjector(data.geometry)
    checkpoint = resolve_checkpoint(args)
    gaussians, init_info = initialise_calibrated(
        args.init, fbp_volume=fbp, extent_mm=data.geometry.volume_extent_mm, project=lambda g: project(g.to(device)),
        measured=data.projections.to(device), num_gaussians=args.num_gaussians, checkpoint=checkpoint,
        mu_water=data.mu_water, seed=args.seed, overlap=args.overlap, model_spacing_mm=args.spacing_mm or None,
        device=str(device), residual_fit_iters=args.residual_fit_iters)
    gaussians = gaussians.to(device)
    info.update(init_info)
    if checkpoint is not None:
        info["checkpoint"] = str(checkpoint)
    return Prepared(fbp, GaussianParams.from_gaussians(gaussians, max_intensity), info)


def run(args) -> dict:
    out = make_output_dir(Path(args.out))  # removed again if the run fails while it is still empty
    device = torch.device(args.device)
    cfg = FitConfig(iters=args.iters, lr_horizon=args.lr_horizon, views_per_iter=args.views_per_iter or None,
                    eval_every=args.eval_every,
                    densify_every=args.densify_every, densify_from=args.densify_every,
                    grad_threshold=args.grad_threshold, densify_fraction=args.densify_fraction,
                    max_gaussians=args.max_gaussians, tv_weight=args.tv,
                    checkpoint_every=args.checkpoint_every, seed=args.seed).validate()
    ck_path = out / CHECKPOINT_NAME  # where this run writes its checkpoints
    resume_from = ck_path if args.resume == "auto" else (Path(args.resume) if args.resume else None)
    if args.resume not in (None, "auto") and not resume_from.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {resume_from}")
    resume_state = None
    if resume_from is not None and resume_from.is_file():
        try:
            resume_state = torch.load(resume_from, map_location=device, weights_only=True)
        except Exception as exc:  # torch raises assorted types for damaged files
            raise ValueError(f"--resume: cannot read {resume_from} ({type(exc).__name__}: {exc})") from None
    data = load_input(args)
    if args.save_projections:
        save_projections(args.save_projections, data)
    reporter = ProgressReporter("reconstruct", cfg.iters, json_lines=args.progress_json)
    try:
        prep = prepare(args, data, device, resume_state)
        measured = data.projections.to(device)
        reference = data.reference.to(device) if data.reference is not None else None
        fit = ReconstructionFit(prep.params, measured, GeometryProjector(data.geometry), data.volume_shape, cfg,
                                reference=reference)
        initial_volume = None
        if resume_state is not None:
            fit.load_state_dict(resume_state, source=str(resume_from))
        else:
            initial_volume = fit.volume()
            if reference is not None:
                prep.info["init_psnr"] = psnr(initial_volume, reference, fit.data_range)
        reporter.start(input=str(args.input), init=args.init, views=data.geometry.n_views,
                       volume_shape=list(data.volume_shape), num_gaussians=fit.params.num_gaussians,
                       resumed_from=fit.result.iterations if resume_state is not None else None)

        def save_state(iteration: int) -> None:
            state = fit.state_dict()
            state["extra"] = {k: v for k, v in prep.info.items() if isinstance(v, (int, float, str))}
            atomic_torch_save(state, ck_path)
            reporter.checkpoint(iteration, str(ck_path))

        def on_progress(entry: dict) -> None:
            reporter.progress(entry["iteration"], **{k: v for k, v in entry.items() if k != "iteration"})

        result = fit.run(on_progress=on_progress, on_checkpoint=save_state)
        save_state(result.iterations)
        metrics = write_outputs(out, args, data, prep, fit, fit.volume(), initial_volume)
        reporter.done(step=result.iterations, out=str(out),
                      **{k: metrics[k] for k in ("psnr", "ssim") if k in metrics})
        return metrics
    except Exception as exc:
        reporter.error(describe(exc))  # the same one line cli.main prints (it then exits 2 for user errors)
        raise


def write_outputs(out: Path, args, data: ProjectionData, prep: Prepared, fit: ReconstructionFit,
                  final: torch.Tensor, initial: torch.Tensor | None) -> dict:
    affine = data.grid_affine()
    save_volume(out / "reconstruction.nii.gz", final, affine)
    save_volume(out / "fbp.nii.gz", prep.fbp, affine)
    if data.mu_water:
        save_volume(out / "reconstruction_hu.nii.gz", mu_to_hu(final, data.mu_water), affine)
    write_gaussians_ply(out / "gaussians.ply", fit.params.gaussians().detach().to("cpu"), shape=data.volume_shape,
                        ijk_to_ras=affine)
    metrics = {
        "input": str(args.input), "init": args.init, "geometry": data.geometry.kind, "views": data.geometry.n_views,
        "volume_shape": list(data.volume_shape), "spacing_mm": list(data.spacing_mm), "filter": args.filter,
        **prep.info, "max_intensity": fit.params.max_intensity, "units": data.meta.get("units", "attenuation, 1/mm (line integrals are dimensionless)"),
        "projection_loss": fit.result.history[-1].get("loss") if fit.result.history else None,
        **fit.final_metrics(), "history": fit.result.history, "densify_log": fit.result.densify_log,
        "meta": data.meta,
    }
    metrics["seconds_per_iteration"] = metrics["fit_seconds"] / max(1, metrics["iterations"])
    slices = {}
    if data.reference is not None:
        ref = data.reference.to(final)
        metrics["data_range"] = float(ref.max() - ref.min())
        metrics["fbp_psnr"] = psnr(prep.fbp, ref, metrics["data_range"])
        metrics["fbp_ssim"] = ssim(prep.fbp, ref, metrics["data_range"])
        metrics["psnr_over_fbp"] = metrics["psnr"] - metrics["fbp_psnr"]
        metrics.update(progress_against_baseline(fit.result.history, metrics["fbp_psnr"]))
        slices["reference"] = mid_slice(ref)
    slices["FBP" if data.geometry.kind == "parallel" else "FDK"] = mid_slice(prep.fbp)
    if initial is not None:
        slices[f"init ({args.init})"] = mid_slice(initial)
    slices[f"Gaussians ({fit.result.iterations} it)"] = mid_slice(final)
    title = f"{Path(str(args.input)).name}: {data.geometry.kind}, {data.geometry.n_views} views"
    save_progress_figure(out / "reconstruction.png", history=fit.result.history, slices=slices, title=title)
    save_comparison(out / "comparison.png", analytic=prep.fbp, gaussians=final, reference=data.reference,
                    analytic_name="FBP" if data.geometry.kind == "parallel" else "FDK",
                    iterations=fit.result.iterations, data_range=metrics.get("data_range"))
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(json_plain(metrics), indent=2))
    tmp.replace(out / "metrics.json")
    return metrics


def main(args) -> int:
    run(args)
    return 0
