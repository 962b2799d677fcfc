"""Finding CT volumes, checking them, and streaming deterministic pre-training crops.

Inputs: a folder (searched recursively) of NIfTI / NRRD / MetaImage files and
DICOM series folders, a single such file or folder, a MONAI-style datalist
JSON (``{"training": [{"image": "..."}]}``), or ``phantom[:N]`` for generated
phantoms. Bad inputs (unreadable, 2D, not CT-like) are reported by name,
skipped and counted; they never stop a long run.

Determinism: the crops of step ``s`` are a pure function of (seed, s, rank,
world size). Each rank reads its own case slots ``rank, rank + W, ...``; slot
``c`` maps to a case through a per-epoch permutation seeded by ``(seed, epoch)``
and its random crops are seeded by ``(seed, c)``. A resumed run therefore sees
exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from monai.data import CacheDataset, Dataset, MetaTensor, PersistentDataset
from monai.transforms import Transform
from torch.utils.data import DataLoader, Sampler

from ..errors import NoUsableInputError  # a user error (exit 2), and still a RuntimeError
from .phantom import make_phantom
from .readers import VOLUME_SUFFIXES, dicom_series_files, has_suffix, read_header
from .transforms import KEY, augment_transforms, preprocess_transforms, root_exception
from .volumes import read_datalist

log = logging.getLogger(__name__)

# Files that are certainly not DICOM slices (a folder holding only these is not probed with GDCM).
_NOT_DICOM_SUFFIXES = VOLUME_SUFFIXES + (".json", ".txt", ".md", ".csv", ".png", ".jpg", ".py", ".yaml", ".yml",
                                         ".pt", ".raw", ".zraw", ".h5", ".gz", ".zip", ".pdf", ".npy", ".npz")


@dataclass
class SkipReport:
    """Inputs that were skipped, by name, with the reason (first reason wins)."""

    reasons: dict[str, str] = field(default_factory=dict)
    verbose: bool = True  # log each new skip as a warning

    def add(self, name: str, reason: str) -> bool:
        """Record a skip; True if ``name`` is new."""
        if name in self.reasons:
            return False
        self.reasons[name] = reason
        if self.verbose:
            log.warning("skipping %s: %s", name, reason)
        return True

    def __len__(self) -> int:
        return len(self.reasons)

    def summary(self) -> str:
        if not self.reasons:
            return "no inputs skipped"
        lines = [f"skipped {len(self.reasons)} input(s):"] + [f"  {n}: {r}" for n, r in self.reasons.items()]
        return "\n".join(lines)


def _case(path: str | Path) -> dict[str, Any]:
    return {KEY: str(path), "name": str(path)}


def load_datalist(path: str | Path, key: str = "training") -> list[dict[str, Any]]:
    """Image cases of a MONAI datalist JSON (``data.volumes.read_datalist``, the one parser)."""
    return [_case(c[KEY]) for c in read_datalist(path, key, fields=(KEY,))]


def discover_volumes(path: str | Path, datalist_key: str = "training") -> list[dict[str, Any]]:
    """Cases ``{"image": path, "name": path}`` found at ``path`` (file, folder or datalist JSON)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data path not found: {path}")
    if path.is_file():
        if has_suffix(path, (".json",)):
            return load_datalist(path, datalist_key)
        if has_suffix(path, VOLUME_SUFFIXES):
            return [_case(path)]
        raise ValueError(f"{path}: not a NIfTI/NRRD/MHA volume, DICOM folder or datalist JSON")
    cases = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        volumes = sorted(f for f in files if has_suffix(f, VOLUME_SUFFIXES))
        cases += [_case(Path(root) / f) for f in volumes]
        others = [f for f in files if not has_suffix(f, _NOT_DICOM_SUFFIXES) and not f.startswith(".")]
        if others and dicom_series_files(root):
            cases.append(_case(root))
    return cases


def header_problem(path: str | Path) -> str | None:
    """Why a volume cannot be used, from its header alone (cheap), or None."""
    try:
        header = read_header(path)
    except ValueError as exc:
        return str(exc).removeprefix(f"{path}: ")
    spatial = header.shape[:3]
    extra = header.shape[3:]
    if len(spatial) < 3 or min(spatial) < 2:
        return f"2D image (shape {header.shape}); a 3D CT is needed"
    if any(n > 1 for n in extra):
        return f"{len(header.shape)}D image (shape {header.shape}); expected one 3D CT"
    if any(not np.isfinite(s) or s <= 0 for s in header.spacing[:3]):
        return f"invalid voxel spacing {header.spacing[:3]}"
    return None


def validate_volumes(cases: Sequence[dict[str, Any]], report: SkipReport) -> list[dict[str, Any]]:
    """Keep the cases whose headers are usable; add the others to ``report``."""
    good = []
    for case in cases:
        problem = header_problem(case[KEY])
        if problem is None:
            good.append(case)
        else:
            report.add(case["name"], problem)
    return good


def phantom_cases(n: int, shape: Sequence[int] = (128, 128, 96), spacing_mm: float = 1.5,
                  seed: int = 0) -> list[dict[str, Any]]:
    """``n`` generated phantoms (seeds ``seed .. seed+n-1``) as in-memory cases (HU, channel-first)."""
    if n < 1:
        raise ValueError(f"number of phantoms must be >= 1, got {n}")
    cases = []
    for i in range(n):
        ph = make_phantom(tuple(shape), spacing_mm=spacing_mm, seed=seed + i)
        image = MetaTensor(torch.from_numpy(ph.hu)[None], affine=torch.as_tensor(ph.affine), meta={"space": "RAS"})
        cases.append({KEY: image, "name": f"phantom_{seed + i:04d}"})
    return cases


def parse_phantom_spec(spec: str) -> int | None:
    """``"phantom"`` -> 8, ``"phantom:N"`` -> N, anything else -> None."""
    if spec == "phantom":
        return 8
    if spec.startswith("phantom:"):
        try:
            return int(spec.split(":", 1)[1])
        except ValueError as exc:
            raise ValueError(f"--data {spec!r}: expected phantom:N with an integer N") from exc
    return None


def error_message(exc: BaseException) -> str:
    """The message of the exception MONAI's "applying transform ..." wrappers were raised from."""
    exc = root_exception(exc)
    return str(exc) or type(exc).__name__


class _Guarded(Transform):
    """Turn a transform's exception into ``{"error": message}`` (so a CacheDataset survives bad files).

    A MONAI ``Transform`` (deterministic): ``CacheDataset`` caches up to the first transform that is random
    *or not a Transform*, so a plain callable here would disable the cache and re-read every case each time."""

    def __init__(self, transform) -> None:
        self.transform = transform

    def __call__(self, data):
        try:
            return self.transform(data)
        except Exception as exc:  # reported and skipped by the caller
            return {"error": error_message(exc), "name": data.get("name")}


class _LoadIfPath(Transform):
    """Preprocess a case read from a path with ``from_file`` and an in-memory array with ``in_memory``, so
    generated phantoms and files can be mixed in one training set."""

    def __init__(self, from_file, in_memory) -> None:
        self.from_file, self.in_memory = from_file, in_memory

    def __call__(self, data):
        return (self.from_file if isinstance(data[KEY], (str, Path)) else self.in_memory)(data)


def derive_seed(*values: int) -> int:
    """A 32-bit seed from a tuple of integers (stable across processes and platforms)."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1)[0])


class PretrainCrops(torch.utils.data.Dataset):
    """Case slot ``c`` -> ``crops_per_case`` random crops ``[C, 1, *roi]`` of one case, deterministic in (seed, c).

    ``cache``: "memory" (MONAI ``CacheDataset``), "disk" (``PersistentDataset``
    in ``cache_dir``) or "none". A case that fails to load is skipped (the next
    case in the epoch's order takes its place) and reported in the item's
    ``"skipped"`` list.
    """

    def __init__(self, cases: Sequence[dict[str, Any]], *, roi_size: int | Sequence[int] = 96,
                 spacing_mm: float | Sequence[float] = 1.5, crops_per_case: int = 3, pos: float = 3.0,
                 neg: float = 1.0, seed: int = 0, cache: str = "none", cache_dir: str | Path | None = None,
                 cache_workers: int = 0) -> None:
        if not cases:
            raise ValueError("no input volumes to train on")
        self.cases = list(cases)
        self.seed = int(seed)
        self.crops_per_case = int(crops_per_case)
        in_memory = any(not isinstance(c[KEY], (str, Path)) for c in self.cases)
        preprocess = _LoadIfPath(preprocess_transforms(spacing_mm, roi_size, load=True),
                                 preprocess_transforms(spacing_mm, roi_size, load=False))
        self.augment = augment_transforms(roi_size, num_samples=crops_per_case, pos=pos, neg=neg)
        if cache == "memory" or in_memory:
            self.base = CacheDataset(self.cases, transform=_Guarded(preprocess), num_workers=cache_workers or None,
                                     progress=False)
        elif cache == "disk":
            if cache_dir is None:
                raise ValueError("cache='disk' needs a cache_dir")
            # One sub-folder per preprocessing setting, so a changed spacing never reads stale volumes.
            settings = json.dumps({"version": 1, "spacing_mm": spacing_mm, "roi_size": roi_size}, sort_keys=True)
            folder = Path(cache_dir) / f"preprocess-{hashlib.sha1(settings.encode()).hexdigest()[:12]}"
            folder.mkdir(parents=True, exist_ok=True)
            self.base = PersistentDataset(self.cases, transform=preprocess, cache_dir=str(folder))
        elif cache == "none":
            self.base = Dataset(self.cases, transform=preprocess)
        else:
            raise ValueError(f"cache must be 'memory', 'disk' or 'none', got {cache!r}")
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.cases)

    def case_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, int(epoch)]).permutation(len(self.cases))

    def _load(self, slot: int) -> tuple[dict[str, Any], list[tuple[str, str]]]:
        n = len(self.cases)
        epoch, pos = divmod(int(slot), n)
        order = self.case_order(epoch)
        skipped = []
        for j in range(n):
            idx = int(order[(pos + j) % n])
            if idx in self._bad:
                continue
            try:
                item = self.base[idx]
                if "error" in item:
                    raise ValueError(item["error"])
                return item, skipped
            except Exception as exc:
                self._bad.add(idx)
                name = self.cases[idx]["name"]
                skipped.append((name, error_message(exc).removeprefix(f"{name}: ")))
        detail = "; ".join(f"{name}: {r}" for name, r in skipped)
        raise NoUsableInputError(f"none of the {n} input volumes could be loaded ({detail})")

    def __getitem__(self, slot: int) -> dict[str, Any]:
        item, skipped = self._load(slot)
        self.augment.set_random_state(seed=derive_seed(self.seed, slot))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Num foregrounds")
            crops = self.augment(dict(item))
        crops = torch.stack([torch.as_tensor(c[KEY]).as_subclass(torch.Tensor).float() for c in crops])
        return {"crops": crops, "slot": int(slot), "skipped": skipped}


class _SlotSampler(Sampler[int]):
    """Endless case slots of one rank: ``k * world + rank`` for ``k = first, first+1, ...``."""

    def __init__(self, first: int, rank: int, world_size: int) -> None:
        self.first, self.rank, self.world_size = int(first), int(rank), int(world_size)

    def __iter__(self) -> Iterator[int]:
        k = self.first
        while True:
            yield k * self.world_size + self.rank
            k += 1


def _identity(item):
    return item


def crop_batches(dataset: PretrainCrops, batch_size: int, *, start_step: int = 0, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0,
                 pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, list[tuple[str, str]]]]:
    """Endless ``(crops [B, 1, *roi], skipped)`` batches of one rank, starting at ``start_step``.

    Step ``s`` of rank ``r`` uses that rank's local crops ``s*B .. s*B + B - 1``
    (``crops_per_case`` consecutive crops per case), so where the stream starts
    does not change what any step sees.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    first_slot, skip = divmod(start_step * batch_size, dataset.crops_per_case)
    loader = DataLoader(dataset, sampler=_SlotSampler(first_slot, rank, world_size), batch_size=None,
                        num_workers=num_workers, collate_fn=_identity, pin_memory=pin_memory,
                        prefetch_factor=2 if num_workers > 0 else None)
    pending: list[torch.Tensor] = []
    skipped: list[tuple[str, str]] = []
    for item in loader:
        pending.extend(item["crops"][skip:])
        skip = 0
        skipped.extend(item["skipped"])
        while len(pending) >= batch_size:
            batch, pending = torch.stack(pending[:batch_size]), pending[batch_size:]
            yield batch, skipped
            skipped = []
