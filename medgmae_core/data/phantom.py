"""A procedural abdominal CT phantom: the project's built-in default CT.

The phantom is an upper-abdomen block in RAS array order (axis 0 runs
left -> Right, axis 1 posterior -> Anterior, axis 2 inferior -> Superior),
with realistic Hounsfield units: skin, subcutaneous fat, a muscle wall,
liver, spleen, kidneys (bright cortex, darker medulla), spine (vertebral
bodies with a cortical shell and discs), ribs, contrast-filled aorta, IVC,
stomach and bowel with air, and lung bases at the top. Anatomy is laid out in
coordinates normalised to the body ellipse, so any grid shape gives a whole
abdomen; ``seed`` varies positions, sizes and HU values.

Everything is vectorised numpy over bounding boxes: 128x128x96 takes well
under a second.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

LABEL_NAMES: dict[int, str] = {
    0: "background",
    1: "body",  # skin and subcutaneous / visceral fat
    2: "muscle",
    3: "liver",
    4: "spleen",
    5: "kidney_right",
    6: "kidney_left",
    7: "vertebrae",
    8: "ribs",
    9: "aorta",
    10: "inferior_vena_cava",
    11: "stomach",
    12: "bowel",
    13: "lung_right",
    14: "lung_left",
}
LABEL_IDS = {name: idx for idx, name in LABEL_NAMES.items()}

# Mean HU per tissue (portal-venous contrast phase); each seed jitters them.
TISSUE_HU: dict[str, float] = {
    "air": -1000.0, "lung": -850.0, "fat": -100.0, "skin": 40.0, "muscle": 45.0, "liver": 100.0,
    "spleen": 110.0, "kidney_cortex": 190.0, "kidney_medulla": 120.0, "cancellous": 200.0,
    "cortical": 900.0, "disc": 85.0, "aorta": 280.0, "ivc": 160.0, "fluid": 15.0, "bowel_wall": 60.0,
}


@dataclass
class Phantom:
    """A phantom CT: ``hu`` [X,Y,Z] float32, ``labels`` [X,Y,Z] uint8, ``affine`` 4x4 (RAS, mm)."""

    hu: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    label_names: dict[int, str] = field(default_factory=lambda: dict(LABEL_NAMES))

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))


class _Canvas:
    """HU and label volumes painted in order, each shape evaluated only over its bounding box.

    Coordinates: ``u, v, w`` in [-1, 1] across the body's half-axes (u: left -> right,
    v: posterior -> anterior) and the volume's height (w: inferior -> superior).
    """

    def __init__(self, shape: tuple[int, int, int], half_axes_vox: tuple[float, float], rng: np.random.Generator):
        self.shape = shape
        self.rng = rng
        centre = [(n - 1) / 2.0 for n in shape]
        self._scale = np.array([half_axes_vox[0], half_axes_vox[1], (shape[2] - 1) / 2.0])
        self._centre = np.array(centre)
        self.hu = np.full(shape, TISSUE_HU["air"], np.float32)
        self.labels = np.zeros(shape, np.uint8)
        # Normalised coordinate of every index along each axis.
        self.axes = [(np.arange(n, dtype=np.float32) - c) / s for n, c, s in zip(shape, self._centre, self._scale)]

    def box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Index box covering normalised coordinates [lo, hi] (clipped to the grid), or None if empty."""
        ilo = np.floor(self._centre + np.asarray(lo) * self._scale).astype(int)
        ihi = np.ceil(self._centre + np.asarray(hi) * self._scale).astype(int) + 1
        ilo = np.clip(ilo, 0, self.shape)
        ihi = np.clip(ihi, 0, self.shape)
        if np.any(ihi <= ilo):
            return None
        return tuple(slice(a, b) for a, b in zip(ilo, ihi))

    def coords(self, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        u, v, w = (ax[s] for ax, s in zip(self.axes, box))
        return u[:, None, None], v[None, :, None], w[None, None, :]

    def ellipsoid(self, centre, radii, angle: float = 0.0) -> tuple[tuple[slice, ...], np.ndarray] | None:
        """Quadratic form q (<= 1 inside) of an ellipsoid rotated by ``angle`` about the S axis."""
        c, r = np.asarray(centre, np.float32), np.asarray(radii, np.float32)
        reach = np.full(3, r.max()) if angle else r
        box = self.box(c - reach, c + reach)
        if box is None:
            return None
        u, v, w = self.coords(box)
        du, dv, dw = u - c[0], v - c[1], w - c[2]
        if angle:
            ca, sa = np.cos(angle), np.sin(angle)
            du, dv = ca * du + sa * dv, -sa * du + ca * dv
        q = (du / r[0]) ** 2 + (dv / r[1]) ** 2 + (dw / r[2]) ** 2
        return box, q

    def cylinder(self, centre_uv, radii_uv, w_range) -> tuple[tuple[slice, ...], np.ndarray] | None:
        """Quadratic form of an elliptic cylinder along S, restricted to ``w_range``."""
        c, r = np.asarray(centre_uv, np.float32), np.asarray(radii_uv, np.float32)
        box = self.box([c[0] - r[0], c[1] - r[1], w_range[0]], [c[0] + r[0], c[1] + r[1], w_range[1]])
        if box is None:
            return None
        u, v, w = self.coords(box)
        q = ((u - c[0]) / r[0]) ** 2 + ((v - c[1]) / r[1]) ** 2 + 0 * w
        return box, q

    def paint(self, shape, label: str | None, hu, *, inside: float = 1.0, where=None) -> None:
        """Set HU (and label) where ``q <= inside`` and ``where(box)`` allows it.

        ``hu`` is a number or a function of the box returning an array (for textures).
        """
        if shape is None:
            return
        box, q = shape
        mask = q <= inside
        if where is not None:
            mask &= where(box)
        if not mask.any():
            return
        if callable(hu):
            hu = hu(box)
        self.hu[box][mask] = hu if np.isscalar(hu) else np.broadcast_to(hu, mask.shape)[mask]
        if label is not None:
            self.labels[box][mask] = LABEL_IDS[label]

    def is_label(self, *names: str):
        ids = [LABEL_IDS[n] for n in names]
        return lambda box: np.isin(self.labels[box], ids)

    def not_label(self, *names: str):
        ids = [LABEL_IDS[n] for n in names]
        return lambda box: ~np.isin(self.labels[box], ids)


def _smooth_noise(shape: tuple[int, int, int], rng: np.random.Generator, cell: int = 6) -> np.ndarray:
    """Zero-mean, unit-ish smooth random field (trilinear upsampling of a coarse grid)."""
    coarse = rng.standard_normal([max(2, n // cell + 2) for n in shape]).astype(np.float32)
    zoom = [n / c for n, c in zip(shape, coarse.shape)]
    return ndimage.zoom(coarse, zoom, order=1, mode="nearest", grid_mode=True)[: shape[0], : shape[1], : shape[2]]


def phantom_affine(shape: tuple[int, int, int], spacing_mm: float | tuple[float, float, float]) -> np.ndarray:
    """RAS affine with the given spacing, centred on the world origin."""
    spacing = np.broadcast_to(np.asarray(spacing_mm, np.float64), (3,))
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -(np.asarray(shape) - 1) / 2.0 * spacing
    return affine


def make_phantom(shape: tuple[int, int, int] = (128, 128, 96), spacing_mm: float | tuple[float, float, float] = 1.5,
                 seed: int = 0, *, noise_hu: float = 8.0) -> Phantom:
    """Build an abdominal CT phantom of ``shape`` (X, Y, Z) in RAS order, HU values in float32."""
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"phantom shape must be 3 sizes >= 8, got {shape}")
    if np.any(np.asarray(spacing_mm, dtype=float) <= 0):
        raise ValueError(f"phantom spacing_mm must be positive, got {spacing_mm}")
    rng = np.random.default_rng(seed)

    def jit(scale: float = 0.03, n: int | None = None):
        return rng.uniform(-scale, scale, n)

    def var(x: float, rel: float = 0.08) -> float:
        return float(x * rng.uniform(1 - rel, 1 + rel))

    hu_t = {k: v + rng.uniform(-30, 30) if k in ("air", "lung") else v + rng.uniform(-12, 12)
            for k, v in TISSUE_HU.items()}
    half = (var(0.47 * (shape[0] - 1), 0.04), var(0.37 * (shape[1] - 1), 0.05))  # body half-axes (voxels)
    cv = _Canvas(shape, half, rng)
    coarse, fine = _smooth_noise(shape, rng), _smooth_noise(shape, rng, cell=3)

    def tissue(name: str, amp: float = 0.0, field: np.ndarray | None = None, *, scale: float = 1.0):
        """HU of a tissue plus a smooth texture of amplitude ``amp`` (HU)."""
        base = hu_t[name] * scale
        if not amp:
            return base
        field = coarse if field is None else field
        return lambda box: base + amp * field[box]

    # Body wall: skin, subcutaneous fat, muscle ring, then the cavity (visceral fat).
    w_all = (-1.1, 1.1)
    body = cv.cylinder((0, 0), (1, 1), w_all)
    cv.paint(body, "body", tissue("skin"))
    skin = 2.0 / min(half)  # ~2 voxels
    cv.paint(body, "body", tissue("fat", 12), inside=(1 - skin) ** 2)
    fat_frac = rng.uniform(0.82, 0.9)
    cv.paint(body, "muscle", tissue("muscle", 6), inside=fat_frac ** 2)
    cavity = cv.cylinder((0, 0.04), (fat_frac - 0.07, fat_frac - 0.08), w_all)
    cv.paint(cavity, "body", lambda box: hu_t["fat"] + 15 * coarse[box] + 10 * fine[box])

    # Paraspinal muscles behind the spine and psoas beside it.
    spine_uv = (float(jit(0.02)), -0.62 + float(jit(0.02)))
    for side in (-1, 1):
        cv.paint(cv.cylinder((spine_uv[0] + side * 0.2, spine_uv[1] - 0.12), (0.15, 0.17), w_all), "muscle",
                 tissue("muscle", 5))
        cv.paint(cv.ellipsoid((spine_uv[0] + side * 0.17, spine_uv[1] + 0.1, -0.9), (0.08, 0.08, 0.75)), "muscle",
                 tissue("muscle", 5))

    # Lung bases at the top, posterior-lateral; the diaphragm domes up into them.
    lung_w = 0.55 + float(jit(0.08))
    for side, name in ((1, "lung_right"), (-1, "lung_left")):
        dome = cv.ellipsoid((side * 0.42, -0.1, lung_w + 1.0), (0.38, 0.52, 1.0 + 0.08 * side))
        cv.paint(dome, name, tissue("lung", 25, fine))

    # Liver: large, right upper quadrant, under the right lung. Spleen: posterior left, upper.
    liver = cv.ellipsoid((0.38 + float(jit()), 0.1 + float(jit()), 0.3 + float(jit(0.05))),
                         (var(0.46), var(0.52), var(0.62)), angle=-0.3)
    cv.paint(liver, "liver", tissue("liver", 6), where=cv.not_label("lung_right"))
    spleen = cv.ellipsoid((-0.6 + float(jit()), -0.25 + float(jit()), 0.35 + float(jit(0.06))),
                          (var(0.16), var(0.26), var(0.3)), angle=0.5)
    cv.paint(spleen, "spleen", tissue("spleen", 5), where=cv.not_label("lung_left"))

    # Kidneys: cortex shell brighter than the medulla; the right kidney sits slightly lower.
    for side, name, dz in ((1, "kidney_right", -0.12), (-1, "kidney_left", 0.0)):
        centre = (side * (0.38 + float(jit(0.02))), spine_uv[1] + 0.12 + float(jit(0.02)), -0.15 + dz + float(jit(0.05)))
        kidney = cv.ellipsoid(centre, (var(0.14), var(0.18), var(0.3)), angle=side * 0.5)
        cv.paint(kidney, name, tissue("kidney_cortex", 8, fine))
        cv.paint(kidney, name, tissue("kidney_medulla", 6, fine), inside=0.45)
        cv.paint(kidney, name, tissue("fluid"), inside=0.08)  # renal pelvis

    # Stomach (left upper, anterior) with an air-fluid level: gas rises anteriorly when supine.
    stom_c = (-0.32 + float(jit()), 0.3 + float(jit()), 0.3 + float(jit(0.05)))
    stomach = cv.ellipsoid(stom_c, (var(0.22), var(0.2), var(0.28)), angle=0.4)
    cv.paint(stomach, "stomach", tissue("bowel_wall"), where=cv.not_label("liver", "spleen", "lung_left"))

    def gastric_content(box):
        _, v, _ = cv.coords(box)
        return np.where(v > stom_c[1] + 0.08, TISSUE_HU["air"], hu_t["fluid"] + 5 * fine[box])

    cv.paint(stomach, "stomach", gastric_content, inside=0.7, where=cv.is_label("stomach"))

    # Bowel loops in the lower abdomen: walls, fluid content or gas.
    for _ in range(int(rng.integers(6, 10))):
        c = (rng.uniform(-0.5, 0.5), rng.uniform(-0.05, 0.45), rng.uniform(-0.95, -0.05))
        r = (rng.uniform(0.07, 0.12), rng.uniform(0.07, 0.12), rng.uniform(0.12, 0.35))
        loop = cv.ellipsoid(c, r, angle=rng.uniform(0, np.pi))
        cv.paint(loop, "bowel", tissue("bowel_wall"), where=cv.is_label("body"))
        content = TISSUE_HU["air"] if rng.random() < 0.6 else tissue("fluid", 5, fine)
        cv.paint(loop, "bowel", content, inside=0.55, where=cv.is_label("bowel"))

    # Great vessels: contrast aorta anterior-left of the spine; the flatter IVC to its right.
    aorta_uv = (spine_uv[0] - 0.07 + float(jit(0.02)), spine_uv[1] + 0.3)
    cv.paint(cv.cylinder(aorta_uv, (var(0.075), var(0.1)), (-1.1, 0.95)), "aorta", tissue("aorta", 6, fine))
    ivc_uv = (spine_uv[0] + 0.17 + float(jit(0.02)), spine_uv[1] + 0.3)
    cv.paint(cv.cylinder(ivc_uv, (var(0.085), var(0.075)), (-1.1, 0.8)), "inferior_vena_cava", tissue("ivc", 6, fine))

    # Spine: stacked vertebral bodies (cortical shell, cancellous core) with discs, and posterior elements.
    vb_r = (var(0.13), var(0.17))
    level_h = var(0.42, 0.1)  # one vertebra + disc, in w units
    offset = rng.uniform(0, level_h)
    for k in range(-1, int(2.2 / level_h) + 2):
        w0 = -1.1 + offset + k * level_h
        mid = w0 + level_h / 2
        vertebral_body = cv.cylinder(spine_uv, vb_r, (w0 + 0.09 * level_h, w0 + 0.91 * level_h))
        cv.paint(vertebral_body, "vertebrae", tissue("cortical"))
        cv.paint(vertebral_body, "vertebrae", tissue("cancellous", 20, fine), inside=0.72)
        cv.paint(cv.cylinder(spine_uv, vb_r, (w0 - 0.09 * level_h, w0 + 0.09 * level_h)), "vertebrae", tissue("disc"))
        arch = cv.ellipsoid((spine_uv[0], spine_uv[1] - vb_r[1] - 0.1, mid), (0.05, 0.14, 0.3 * level_h))
        cv.paint(arch, "vertebrae", tissue("cortical", scale=0.7))
        for side in (-1, 1):  # transverse processes
            process = cv.ellipsoid((spine_uv[0] + side * 0.16, spine_uv[1] - 0.1, mid), (0.11, 0.035, 0.2 * level_h))
            cv.paint(process, "vertebrae", tissue("cortical", scale=0.6))
    canal = cv.cylinder((spine_uv[0], spine_uv[1] - vb_r[1] - 0.06), (0.045, 0.05), w_all)
    cv.paint(canal, "body", tissue("fluid"))  # CSF

    # Ribs in the upper half: thin arcs just inside the muscle wall, sloping down anteriorly.
    rib_step = var(0.22, 0.05)
    for k in range(5):
        w_rib = 1.05 - rib_step * (k + rng.uniform(0, 0.3))
        ring = cv.cylinder((0, 0), (fat_frac - 0.02, fat_frac - 0.02), (w_rib - 0.2, w_rib + 0.2))
        if ring is None:
            continue

        def rib_arc(box, q=ring[1], w_rib=w_rib):
            u, v, w = cv.coords(box)
            lateral = np.abs(np.abs(np.arctan2(v, u)) - np.pi / 2) > 0.35  # not over the spine or midline
            return lateral & (np.abs(w - w_rib + 0.15 * v) < 0.035) & (q >= 0.84)

        cv.paint(ring, "ribs", tissue("cortical", scale=0.8), where=rib_arc)

    hu = cv.hu
    hu += noise_hu * rng.standard_normal(shape, dtype=np.float32)
    np.clip(hu, -1024.0, 3071.0, out=hu)
    return Phantom(hu=hu, labels=cv.labels, affine=phantom_affine(shape, spacing_mm))


def write_phantom_nifti(out_dir: str | Path, shape: tuple[int, int, int] = (128, 128, 96),
                        spacing_mm: float | tuple[float, float, float] = 1.5, seed: int = 0,
                        name: str = "phantom") -> dict[str, Path]:
    """Write ``{name}_ct.nii.gz`` (int16 HU) and ``{name}_labels.nii.gz`` (uint8); return their paths."""
    import nibabel as nib  # lazy: data.phantom stays numpy/scipy only (data/__init__.py)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ph = make_phantom(shape, spacing_mm=spacing_mm, seed=seed)
    paths = {"image": out / f"{name}_ct.nii.gz", "label": out / f"{name}_labels.nii.gz"}
    ct = nib.Nifti1Image(np.round(ph.hu).astype(np.int16), ph.affine)
    ct.header.set_xyzt_units("mm")
    nib.save(ct, str(paths["image"]))
    lab = nib.Nifti1Image(ph.labels, ph.affine)
    lab.header.set_xyzt_units("mm")
    nib.save(lab, str(paths["label"]))
    return paths
