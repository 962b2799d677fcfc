"""The module logic's background part: Train and Reconstruct run the ``medgmae`` CLI with Slicer's Python in a
background process.

Commands are built here from the panel's settings and run through :class:`jobs.BackgroundJob`
(JSON progress lines, whole-tree cancel). ``run_*`` methods are the blocking paths for batch scripts.
Each panel owns its inputs: training has its own device and fine-tuning encoder, reconstruction its own device
and checkpoint; nothing is borrowed from the Predict panel. This part holds no scene: a simulated scan starts from a
CT that ``ct_writer`` (the logic passes its display part's ``write_input_ct``) writes to a file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from .jobs import BackgroundJob
from .parameters import MedGMAEParameters, choice_value, is_set
from .prediction import resolve_device


class BackgroundLogic:
    """Train and Reconstruct: the ``medgmae`` CLI in a background process (``MedGMAELogic.background``).

    ``ct_writer(volume_node, path) -> path`` writes the input CT of a simulated scan (only
    :meth:`start_reconstruction_from_parameters` needs it)."""

    def __init__(self, *, ct_writer: Callable | None = None) -> None:
        self.ct_writer = ct_writer

    def training_command(self, *, command: str = "pretrain", data_folder, out_dir, config: str = "tiny",
                         steps: int = 1000, device: str = "auto", resume: bool = False,
                         pretrained: str | Path | None = None, extra_args: Sequence[str] = ()) -> list[str]:
        """``medgmae pretrain|finetune`` arguments (without the Python prefix). ``data_folder`` may also be
        ``phantom[:N]`` (generated phantoms); ``extra_args`` are passed through (e.g. ``--img-size 48``)."""
        MedGMAEParameters.check(trainCommand=command, trainConfig=config, trainSteps=steps, trainDevice=device)
        command, config, device = choice_value(command), choice_value(config), choice_value(device)
        if device == "cuda":
            resolve_device(device)  # a clear error now, not in the child's log
        # "auto" is passed on: pretrain and finetune resolve it themselves (no torch import in Slicer's GUI)
        is_phantom = str(data_folder).startswith("phantom")
        if not is_phantom and not is_set(data_folder):
            raise ValueError("training data: choose a folder of CTs (or a datalist JSON), or type phantom:8")
        if not is_phantom and not Path(data_folder).exists():
            raise FileNotFoundError(f"training data folder {data_folder!s} does not exist")
        if not is_set(out_dir):
            raise ValueError("training output folder: choose a folder for checkpoints")
        # one vocabulary for both commands (medgmae_core/commands/options.py): --model SIZE, --out, --resume auto
        args = ["--data", str(data_folder), "--model", config, "--steps", str(int(steps)), "--device", device,
                "--out", str(out_dir), "--progress-json"] + (["--resume", "auto"] if resume else [])
        if command != "pretrain" and is_set(pretrained):  # medgmae finetune: UNETR from a pre-trained encoder
            args += ["--encoder", str(pretrained)]
        return [command, *args, *map(str, extra_args)]

    def start_training(self, *, start: bool = True, **kwargs):
        """Start pre-training / fine-tuning in a background process; returns the running ``BackgroundJob``."""
        argv = self.training_command(**kwargs)
        Path(kwargs["out_dir"]).mkdir(parents=True, exist_ok=True)
        job = BackgroundJob.cli(*argv, cwd=str(kwargs["out_dir"]))
        return job.start() if start else job

    def start_training_from_parameters(self, params: MedGMAEParameters, start: bool = True):
        """The Train panel: its own data, output, device and (fine-tuning) encoder checkpoint."""
        return self.start_training(command=params.trainCommand, data_folder=params.trainDataFolder,
                                   out_dir=params.trainOutputFolder, config=params.trainConfig,
                                   steps=params.trainSteps, device=params.trainDevice, resume=params.trainResume,
                                   pretrained=params.finetuneEncoderPath, start=start)

    def run_training(self, *, timeout: float | None = None, **kwargs):
        """Blocking path for batch scripts: returns the ``JobResult``; raises with the error lines on failure."""
        result = self.start_training(**kwargs).wait_for_completion(timeout=timeout)
        if not result.ok:
            raise RuntimeError(result.error)
        return result

    # ------------------------------------------------------------------ reconstruct
    def reconstruction_command(self, *, out_dir, source: str = "simulate", input_path=None, geometry: str = "parallel",
                               views: int = 60, init: str = "medgmae", iterations: int = 300,
                               checkpoint=None, device: str = "cpu", resume: bool = False,
                               extra_args: Sequence[str] = ()) -> list[str]:
        """``medgmae reconstruct`` arguments: ``input_path`` is the CT to simulate a scan from (``source="simulate"``)
        or the projections file (``source="projections"``)."""
        MedGMAEParameters.check(reconSource=source, reconGeometry=geometry, reconViews=views, reconInit=init,
                                reconIterations=iterations)
        source, geometry, init = choice_value(source), choice_value(geometry), choice_value(init)
        device = resolve_device(choice_value(device))  # `medgmae reconstruct --device` takes a concrete device
        if not is_set(input_path) or not Path(input_path).exists():
            what = "CT volume" if source == "simulate" else "projection file"
            raise FileNotFoundError(f"reconstruction input: {what} {input_path!s} does not exist")
        if not is_set(out_dir):
            raise ValueError("reconstruction output folder: choose a folder")
        args = ["reconstruct", str(input_path), "--out", str(out_dir), "--init", init, "--iters", str(int(iterations)),
                "--device", device]
        if source == "simulate":
            args += ["--geometry", geometry, "--views", str(int(views))]
        if init.startswith("medgmae") and is_set(checkpoint):
            args += ["--checkpoint", str(checkpoint)]
        if resume:
            args += ["--resume"]
        return args + [str(a) for a in extra_args]

    def start_reconstruction(self, *, start: bool = True, **kwargs):
        """Start ``medgmae reconstruct`` in a background process; returns the ``BackgroundJob``."""
        argv = self.reconstruction_command(**kwargs)
        Path(kwargs["out_dir"]).mkdir(parents=True, exist_ok=True)
        job = BackgroundJob.cli(*argv, cwd=str(kwargs["out_dir"]))
        return job.start() if start else job

    def start_reconstruction_from_parameters(self, params: MedGMAEParameters, start: bool = True):
        """The Reconstruct panel: its own source, output, device and checkpoint."""
        if not is_set(params.reconOutputFolder):
            raise ValueError("reconstruction output folder: choose a folder")
        if choice_value(params.reconSource) == "simulate":
            if params.inputVolume is None:
                raise ValueError("input CT volume: choose the CT to simulate a scan of (Mask section)")
            if self.ct_writer is None:
                raise ValueError("simulated scan: this background logic has no CT writer (ct_writer)")
            input_path = self.ct_writer(params.inputVolume, Path(params.reconOutputFolder) / "input_ct.nii.gz")
        else:
            input_path = params.projectionsPath
        return self.start_reconstruction(out_dir=params.reconOutputFolder, source=params.reconSource,
                                         input_path=input_path, geometry=params.reconGeometry, views=params.reconViews,
                                         init=params.reconInit, iterations=params.reconIterations,
                                         checkpoint=params.reconCheckpointPath, device=params.reconDevice,
                                         start=start)

    def run_reconstruction(self, *, timeout: float | None = None, **kwargs):
        """Blocking path for batch scripts: the ``JobResult``; raises with the error lines on failure."""
        result = self.start_reconstruction(**kwargs).wait_for_completion(timeout=timeout)
        if not result.ok:
            raise RuntimeError(result.error)
        return result
