"""Shared benchmark helpers: best-of timing, peak extra memory, JSON output.

Benchmarks compare ratios measured in the same run, since the machine is noisy.
"""
from __future__ import annotations

import gc
import json
import os
import platform
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _can_reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak extra resident memory (MB) over a block, relative to its start.

    CPU: resets the kernel's high-water mark (``/proc/self/clear_refs`` = 5) and
    reads ``VmHWM``; falls back to sampling ``VmRSS`` every millisecond.
    CUDA: ``torch.cuda.max_memory_allocated`` when ``device`` is a CUDA device.
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.peak_extra_mb = float("nan")

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._base = _rss_kb("VmRSS")
        self._hwm = _can_reset_peak()
        self._stop = threading.Event()
        self._sampled = self._base
        if not self._hwm:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._sampled = max(self._sampled, _rss_kb("VmRSS"))
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_extra_mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
            return
        if self._hwm:
            peak = _rss_kb("VmHWM")
        else:
            self._stop.set()
            self._thread.join()
            peak = self._sampled
        self.peak_extra_mb = max(0.0, (peak - self._base) / 1024.0)


def best_of(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> float:
    """Best wall time in seconds over ``repeats`` calls, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def machine_info() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "processor": platform.processor(),
    }


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine_info(), **payload}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)
    print(f"wrote {path}")
