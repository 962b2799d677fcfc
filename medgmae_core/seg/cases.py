"""Fine-tuning cases: where they come from, which are used, and each step's batch.

Sources: ``phantom:N`` (generated phantoms with their label volumes, in memory), a MONAI datalist JSON
(``data.volumes.read_datalist``, the one parser; its ``validation`` list is used when present) or
``--case IMAGE LABEL`` pairs. ``task_cases`` turns a ``FinetuneSettings`` into the run's cases and label maps:
the source map (``--label-map``) names the label ids, ``--classes`` picks the task's classes (contiguous ids
1..K), ``split_validation`` holds out ``--val-fraction`` when there is no validation list, and
``select_fraction`` keeps ``--label-fraction`` of the training cases (at least one), chosen by a permutation
seeded with ``--seed``. ``preprocess_cases`` runs the deterministic pipeline once per case; ``step_batch`` makes
step ``s``'s crops from (seed, s) alone, so a resumed run sees the batches an uninterrupted one would.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from monai.data import MetaTensor

from ..data.datasets import derive_seed, parse_phantom_spec
from ..data.phantom import LABEL_NAMES, make_phantom
from ..data.volumes import read_datalist
from .labels import LabelMap
from .settings import FinetuneSettings
from .transforms import IMAGE, LABEL

log = logging.getLogger(__name__)


@dataclass
class TaskCases:
    """A run's cases as given (not yet preprocessed) and its label maps."""

    train: list[dict]                  # the ``label_fraction`` share of the training cases
    val: list[dict]
    available: int                     # training cases before the label fraction
    task: LabelMap                     # the task's classes, ids 1..K
    source: LabelMap | None            # the label volumes' own ids (None: ``classes`` gave ids)
    load: bool                         # True: the cases are file paths; False: in-memory volumes


# ============================================================== sources
def phantom_label_cases(n: int, shape: Sequence[int], spacing_mm: float, seed: int) -> tuple[list[dict], LabelMap]:
    """``n`` generated phantoms with their label volumes, as in-memory channel-first cases."""
    if n < 1:
        raise ValueError(f"number of phantoms must be >= 1, got {n}")
    cases = []
    for i in range(n):
        ph = make_phantom(tuple(int(s) for s in shape), spacing_mm=spacing_mm, seed=seed + i)
        aff = torch.as_tensor(ph.affine)
        cases.append({IMAGE: MetaTensor(torch.from_numpy(ph.hu)[None], affine=aff),
                      LABEL: MetaTensor(torch.from_numpy(ph.labels.astype(np.float32))[None], affine=aff.clone()),
                      "name": f"phantom_{seed + i:04d}"})
    return cases, LabelMap({k: v for k, v in LABEL_NAMES.items() if k != 0})


def datalist_cases(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(training, validation) cases of a MONAI datalist JSON with ``image`` and ``label`` paths
    (``data.volumes.read_datalist``, the one parser); every path must exist."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"datalist not found: {path}")
    out = []
    for key in ("training", "validation"):
        cases = read_datalist(path, key, fields=(IMAGE, LABEL), missing_ok=True)
        for i, case in enumerate(cases):
            for k in (IMAGE, LABEL):
                if not Path(case[k]).exists():
                    raise FileNotFoundError(f"{path}: {key}[{i}] {k} not found: {case[k]}")
        out.append(cases)
    if not out[0]:
        raise ValueError(f"{path}: the datalist has no 'training' cases")
    return out[0], out[1]


def pair_cases(pairs: Sequence[Sequence[str]]) -> list[dict]:
    """``--case IMAGE LABEL`` pairs as cases named by their image."""
    return [{IMAGE: str(i), LABEL: str(l), "name": str(i)} for i, l in (pairs or [])]


def task_labels(source: LabelMap | None, classes: str | None) -> LabelMap:
    """The task's label map: ``classes`` selected from ``source`` (names), or ``classes`` as ids without one."""
    if source is None and not classes:
        raise ValueError("--label-map is needed to name the label ids (or give --classes as ids)")
    if source is not None:
        return source.select(classes)
    ids = [int(c) for c in classes.split(",")]  # type: ignore[union-attr]
    return LabelMap({k: f"label_{i}" for k, i in enumerate(ids, start=1)},
                    {k: (int(i),) for k, i in enumerate(ids, start=1)})


def task_cases(settings: FinetuneSettings) -> TaskCases:
    """The run's training and validation cases and label maps from its data settings; every file must exist."""
    s = settings
    n_phantoms = parse_phantom_spec(s.data) if s.data else None
    val: list[dict] = []
    if n_phantoms:
        cases, source = phantom_label_cases(n_phantoms, s.phantom_shape, s.phantom_spacing, s.seed)
        load = False
    else:
        if s.data:
            cases, val = datalist_cases(s.data)
        else:
            cases = pair_cases(s.cases)
        if not cases:
            raise ValueError("no training data: give --data DATALIST.json | phantom:N, or --case IMAGE LABEL")
        for c in cases:
            for k in (IMAGE, LABEL):
                if not Path(c[k]).exists():
                    raise FileNotFoundError(f"{k} not found: {c[k]}")
        source = LabelMap.from_json(s.label_map) if s.label_map else None
        load = True
    if s.label_map and n_phantoms:
        source = LabelMap.from_json(s.label_map)
    task = task_labels(source, s.classes)
    if not val:
        cases, val = split_validation(cases, s.val_fraction, s.seed)
    train = [cases[i] for i in select_fraction(len(cases), s.label_fraction, s.seed)]
    if not val:
        log.warning("no validation cases (one case only): validating on the training case")
        val = train[:1]
    return TaskCases(train, val, len(cases), task, source, load)


# ============================================================== selection
def split_validation(cases: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out ``val_fraction`` of the cases (at least one, if there are two or more)."""
    if len(cases) < 2 or val_fraction <= 0:
        return cases, []
    k = min(len(cases) - 1, max(1, int(round(val_fraction * len(cases)))))
    order = np.random.default_rng([int(seed), 104729]).permutation(len(cases))
    val = sorted(int(i) for i in order[:k])
    return [c for i, c in enumerate(cases) if i not in val], [cases[i] for i in val]


def select_fraction(n: int, fraction: float, seed: int) -> list[int]:
    """Indices of ``max(1, round(fraction * n))`` of ``n`` training cases, a seeded choice (sorted)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"--label-fraction must be in (0, 1], got {fraction}")
    if n < 1:
        raise ValueError("no training cases")
    k = max(1, int(round(fraction * n)))
    return sorted(int(i) for i in np.random.default_rng([int(seed), 7919]).permutation(n)[:k])


# ============================================================== preprocessing and batches
def preprocess_cases(cases: list[dict], transform) -> list[dict]:
    """Run the deterministic pipeline once per case (kept in memory); errors name the case."""
    out = []
    for case in cases:
        try:
            item = transform(dict(case))
        except Exception as exc:  # MONAI wraps errors; surface the first line with the case name
            msg = str(exc)
            inner = exc.__cause__ or exc.__context__
            while inner is not None and not isinstance(inner, ValueError):
                inner = inner.__cause__ or inner.__context__
            msg = str(inner) if inner is not None else msg
            name = case.get("name", "case")
            raise ValueError(msg if str(name) in msg else f"{name}: {msg}") from None
        item["name"] = case.get("name", "case")
        out.append(item)
    return out


def step_batch(cases: list[dict], augment, step: int, batch_size: int, crops_per_case: int,
               seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The crops of step ``step``: a pure function of (seed, step). -> image, label ``[B, 1, *roi]``."""
    rng = np.random.default_rng([int(seed), int(step)])
    images, labels = [], []
    j = 0
    while len(images) < batch_size:
        case = cases[int(rng.integers(len(cases)))]
        augment.set_random_state(seed=derive_seed(seed, step, j))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Num foregrounds")
            crops = augment({IMAGE: case[IMAGE], LABEL: case[LABEL]})
        for c in crops[: batch_size - len(images)]:
            images.append(torch.as_tensor(c[IMAGE]).as_subclass(torch.Tensor).float())
            labels.append(torch.as_tensor(c[LABEL]).as_subclass(torch.Tensor).float())
        j += 1
    return torch.stack(images), torch.stack(labels)
