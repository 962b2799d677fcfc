"""Train and Reconstruct panels: the ``medgmae`` CLI run with Slicer's Python in a background process.

Commands are built here from the panel's settings and run through :class:`jobs.BackgroundJob`
(JSON progress lines, whole-tree cancel). ``run_*`` methods are the blocking paths for batch scripts.
"""
from __future__ import annotations

from pathlib import Path

from .jobs import BackgroundJob
from .parameters import MedGMAEParameters, is_set


class BackgroundLogic:
    """Train and Reconstruct panels: the ``medgmae`` CLI in a background process (``jobs.BackgroundJob``)."""

    def training_command(self, *, command: str = "pretrain", data_folder, out_dir, config: str = "tiny",
                         steps: int = 1000, device: str = "auto", resume: bool = False,
                         pretrained: str | Path | None = None) -> list[str]:
        """``medgmae pretrain|finetune`` arguments (without the Python prefix)."""
        MedGMAEParameters(trainCommand=command, trainConfig=config, trainSteps=steps, trainDevice=device)
        if not is_set(data_folder) or not Path(data_folder).exists():
            raise FileNotFoundError(f"training data folder {data_folder!s} does not exist")
        if not is_set(out_dir):
            raise ValueError("training output folder: choose a folder for checkpoints")
        args = ["--data", str(data_folder), "--model", config, "--steps", str(int(steps)), "--device", device,
                "--out-dir", str(out_dir)]
        if resume:
            args += ["--resume", "auto"]
        if command == "finetune" and is_set(pretrained):
            args += ["--pretrained", str(pretrained)]
        return [command, *args]

    def start_training(self, *, start: bool = True, **kwargs):
        """Start pre-training / fine-tuning in a background process; returns the running ``BackgroundJob``."""
        argv = self.training_command(**kwargs)
        Path(kwargs["out_dir"]).mkdir(parents=True, exist_ok=True)
        job = BackgroundJob.cli(*argv, cwd=str(kwargs["out_dir"]))
        return job.start() if start else job

    def start_training_from_parameters(self, params: MedGMAEParameters, start: bool = True):
        return self.start_training(command=params.trainCommand, data_folder=params.trainDataFolder,
                                   out_dir=params.trainOutputFolder, config=params.trainConfig,
                                   steps=params.trainSteps, device=params.trainDevice, resume=params.trainResume,
                                   pretrained=params.checkpointPath, start=start)

    def run_training(self, *, timeout: float | None = None, **kwargs):
        """Blocking path for batch scripts: returns the ``JobResult``; raises with the error lines on failure."""
        result = self.start_training(**kwargs).wait_for_completion(timeout=timeout)
        if not result.ok:
            raise RuntimeError(result.error)
        return result
