"""Label names and ids: reading label-map JSON, choosing a class subset, remapping to contiguous ids.

A :class:`LabelMap` is ``{id: name}`` for ids >= 1 (0 is always background). It reads

* TotalSegmentator's ``labels_total_v2.json`` layout: ``{"labels": {"1": "spleen", ...}, ...}``;
* a plain ``{"1": "spleen", ...}`` or ``{"spleen": 1, ...}`` mapping;
* our own sidecar (written by ``medgmae segment``): ``{"format": "medgmae-labels/1", "labels": {...}}``.

A training task picks classes by name from a source map, e.g. ``liver,spleen,kidney_left,kidney_right``,
or merges several source labels into one class with ``kidneys=kidney_left+kidney_right``. The task's
classes get contiguous ids 1..K in the order given; :func:`class_lookup` builds the lookup table that
turns a source label volume into the task's ids (unselected labels become background).
"""
from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

LABELS_FORMAT = "medgmae-labels/1"


@dataclass(frozen=True)
class LabelMap:
    """``names[id] = name`` for ids >= 1; ``sources[id]`` = the source-map ids merged into this class."""

    names: dict[int, str]
    sources: dict[int, tuple[int, ...]] | None = None

    def __post_init__(self) -> None:
        seen: dict[str, int] = {}
        for idx, name in self.names.items():
            if not isinstance(idx, int) or idx < 1 or idx > 65535:
                raise ValueError(f"label ids must be integers in 1..65535 (0 is background), got {idx!r}")
            if not name or not isinstance(name, str):
                raise ValueError(f"label {idx} has an empty or non-string name {name!r}")
            if name in seen:
                raise ValueError(f"label name {name!r} is used by ids {seen[name]} and {idx}")
            seen[name] = idx

    # ---------------------------------------------------------------- lookup
    @property
    def ids(self) -> list[int]:
        return sorted(self.names)

    @property
    def num_classes(self) -> int:
        """Output channels of a network for this map: background + the largest id."""
        return max(self.names, default=0) + 1

    def id_of(self, name: str) -> int:
        for idx, n in self.names.items():
            if n == name:
                return idx
        close = difflib.get_close_matches(name, list(self.names.values()), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"label {name!r} is not in the label map ({len(self.names)} labels){hint}")

    def is_contiguous(self) -> bool:
        return self.ids == list(range(1, len(self.names) + 1))

    # ------------------------------------------------------------------- I/O
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, origin: str = "label map") -> "LabelMap":
        raw = data.get("labels", data) if isinstance(data, Mapping) else data
        if not isinstance(raw, Mapping) or not raw:
            raise ValueError(f"{origin}: expected a non-empty {{id: name}} mapping (or {{'labels': {{...}}}})")
        names: dict[int, str] = {}
        for key, value in raw.items():
            if str(key).startswith("_"):
                continue
            try:
                if str(key).lstrip("-").isdigit():
                    idx, name = int(key), value
                else:  # {name: id}
                    idx, name = int(value), key
            except (TypeError, ValueError):
                raise ValueError(f"{origin}: entry {key!r}: {value!r} is neither id->name nor name->id") from None
            if idx == 0:
                continue  # background
            names[idx] = str(name)
        sources = None
        if isinstance(data, Mapping) and isinstance(data.get("sources"), Mapping):
            sources = {int(k): tuple(int(s) for s in v) for k, v in data["sources"].items()}
        try:
            return cls(names, sources)
        except ValueError as exc:
            raise ValueError(f"{origin}: {exc}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "LabelMap":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"label map JSON not found: {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"label map {path} is not valid JSON: {exc}") from None
        return cls.from_dict(data, origin=f"label map {path}")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": LABELS_FORMAT, "labels": {str(k): self.names[k] for k in self.ids}}
        if self.sources is not None:
            out["sources"] = {str(k): list(v) for k, v in sorted(self.sources.items())}
        return out

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    # ------------------------------------------------------------- selection
    def select(self, spec: str | Iterable[str] | None) -> "LabelMap":
        """The task map for ``spec`` (``"liver,spleen"``, ``"kidneys=kidney_left+kidney_right"``,
        or a list of such items): contiguous ids 1..K and ``sources`` pointing into this map.
        ``None`` keeps every label, renumbered contiguously."""
        if spec is None:
            items = [self.names[i] for i in self.ids]
        elif isinstance(spec, str):
            items = [s.strip() for s in spec.split(",") if s.strip()]
        else:
            items = [str(s).strip() for s in spec]
        if not items:
            raise ValueError("the class list is empty; give names like 'liver,spleen'")
        names: dict[int, str] = {}
        sources: dict[int, tuple[int, ...]] = {}
        used: dict[int, str] = {}
        for k, item in enumerate(items, start=1):
            name, _, members = item.partition("=")
            name = name.strip()
            parts = [m.strip() for m in members.split("+")] if members else [name]
            src = tuple(self.id_of(p) for p in parts)
            for s in src:
                if s in used:
                    raise ValueError(f"label {self.names[s]!r} is used twice (in {used[s]!r} and {name!r})")
                used[s] = name
            names[k], sources[k] = name, src
        return LabelMap(names, sources)


def class_lookup(task: LabelMap, source: LabelMap | None = None) -> np.ndarray:
    """A lookup table ``lut[source_id] -> task_id`` (0 for labels outside the task).

    ``task.sources`` gives the source ids; without them the task's own ids are kept.
    ``source`` (optional) sizes the table to cover every id of the source map."""
    src_of = task.sources or {k: (k,) for k in task.ids}
    top = max([max(s) for s in src_of.values()] + ([max(source.ids)] if source and source.names else []))
    lut = np.zeros(max(top, 255) + 1, dtype=np.int64)
    for k, src in src_of.items():
        lut[list(src)] = k
    return lut


def check_label_ids(labels: np.ndarray, label_map: LabelMap, *, origin: str) -> None:
    """Clear error when ``labels`` holds ids the label map does not name."""
    present = np.unique(labels)
    if present.size and (present.min() < 0 or not np.all(np.equal(np.mod(present, 1), 0))):
        raise ValueError(f"{origin}: label values must be non-negative integers, got {present[:8]}")
    unknown = sorted(int(v) for v in present if v != 0 and int(v) not in label_map.names)
    if unknown:
        raise ValueError(f"{origin} contains label ids {unknown[:12]}{' ...' if len(unknown) > 12 else ''} "
                         f"that are not in the label map (which names {len(label_map.names)} ids, "
                         f"max {max(label_map.ids, default=0)})")


def remap_labels(labels: np.ndarray, task: LabelMap, source: LabelMap | None = None, *,
                 origin: str = "label volume") -> np.ndarray:
    """Source label volume -> task ids (uint8/uint16). Ids missing from ``source`` raise."""
    if source is not None:
        check_label_ids(labels, source, origin=origin)
    lut = class_lookup(task, source)
    ints = np.asarray(labels).astype(np.int64, copy=False)
    if ints.size and ints.max() >= lut.size:
        raise ValueError(f"{origin} contains label id {int(ints.max())} beyond the label map")
    out = lut[ints]
    return out.astype(np.uint8 if task.num_classes <= 256 else np.uint16)


def sidecar_path(label_volume: str | Path) -> Path:
    """``seg.nii.gz`` -> ``seg.labels.json`` (the names of a label volume's ids)."""
    p = Path(label_volume)
    name = p.name
    for ext in (".nii.gz", ".nii", ".seg.nrrd", ".nrrd", ".mha", ".mhd"):
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    return p.with_name(name + ".labels.json")
