"""GaussianSet: the one container for batches of anisotropic 3D Gaussians.

Conventions used everywhere in the project:

* A volume tensor is ``[B, D, H, W]`` (or ``[D, H, W]``); axis ``a`` of the
  spatial grid is coordinate ``a`` of a centre, so ``centres[..., 0]`` runs
  along D, ``[..., 1]`` along H and ``[..., 2]`` along W.
* Coordinates are normalised to ``[0, 1]`` per axis; voxel ``i`` on an axis of
  ``N`` voxels sits at ``i / (N - 1)``.
* Scales are standard deviations in the same normalised units, before rotation.
* Quaternions are ordered ``(w, x, y, z)``; ``R(q)`` maps the Gaussian's own
  axes into volume axes, and ``Sigma = R diag(s)^2 R^T``.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterator

import torch

PARAMS_PER_GAUSSIAN = 11  # centre 3 + scale 3 + quaternion 4 + intensity 1


class GaussianValidationError(ValueError):
    """A GaussianSet argument is malformed; the message names the argument."""


def quaternion_to_rotation(q: torch.Tensor) -> torch.Tensor:
    """Unit quaternions ``[..., 4]`` (w, x, y, z) -> rotation matrices ``[..., 3, 3]``.

    The input is normalised here, so any non-zero quaternion is accepted.
    """
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ]
    return torch.stack(rows, dim=-1).reshape(q.shape[:-1] + (3, 3))


def rotation_to_quaternion(rot: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``[..., 3, 3]`` -> unit quaternions ``[..., 4]`` with w >= 0."""
    m = rot
    trace = m[..., 0, 0] + m[..., 1, 1] + m[..., 2, 2]
    # Four candidate solutions; pick the numerically largest denominator per element.
    cand = torch.stack([
        torch.stack([1 + trace, m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], -1),
        torch.stack([m[..., 2, 1] - m[..., 1, 2], 1 + m[..., 0, 0] - m[..., 1, 1] - m[..., 2, 2], m[..., 0, 1] + m[..., 1, 0], m[..., 0, 2] + m[..., 2, 0]], -1),
        torch.stack([m[..., 0, 2] - m[..., 2, 0], m[..., 0, 1] + m[..., 1, 0], 1 - m[..., 0, 0] + m[..., 1, 1] - m[..., 2, 2], m[..., 1, 2] + m[..., 2, 1]], -1),
        torch.stack([m[..., 1, 0] - m[..., 0, 1], m[..., 0, 2] + m[..., 2, 0], m[..., 1, 2] + m[..., 2, 1], 1 - m[..., 0, 0] - m[..., 1, 1] + m[..., 2, 2]], -1),
    ], dim=-2)  # [..., 4, 4]
    diag = torch.stack([1 + trace, 1 + m[..., 0, 0] - m[..., 1, 1] - m[..., 2, 2],
                        1 - m[..., 0, 0] + m[..., 1, 1] - m[..., 2, 2], 1 - m[..., 0, 0] - m[..., 1, 1] + m[..., 2, 2]], -1)
    best = diag.argmax(-1)
    q = torch.gather(cand, -2, best[..., None, None].expand(best.shape + (1, 4))).squeeze(-2)
    q = q / q.norm(dim=-1, keepdim=True)
    return torch.where(q[..., :1] < 0, -q, q)


def covariance_from(scales: torch.Tensor, quaternions: torch.Tensor) -> torch.Tensor:
    """``Sigma = R diag(s)^2 R^T`` from scales ``[..., 3]`` and quaternions ``[..., 4]`` -> ``[..., 3, 3]``."""
    rs = quaternion_to_rotation(quaternions) * scales[..., None, :]  # R diag(s), columns scaled
    return rs @ rs.transpose(-1, -2)


def precision_from(scales: torch.Tensor, quaternions: torch.Tensor) -> torch.Tensor:
    """``Sigma^-1 = R diag(1/s)^2 R^T`` computed without a matrix inverse -> ``[..., 3, 3]``."""
    rs = quaternion_to_rotation(quaternions) / scales[..., None, :]
    return rs @ rs.transpose(-1, -2)


@dataclass
class GaussianSet:
    """A batch of ``k`` Gaussians per item: the 11 numbers of MedGMAE.

    centres ``[B, k, 3]`` in [0, 1]^3, scales ``[B, k, 3]`` (> 0),
    quaternions ``[B, k, 4]`` (w, x, y, z; need not be normalised but must be
    non-zero), intensities ``[B, k]``.
    """

    centres: torch.Tensor
    scales: torch.Tensor
    quaternions: torch.Tensor
    intensities: torch.Tensor

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> "GaussianSet":
        expected_last = {"centres": 3, "scales": 3, "quaternions": 4}
        ref = self.centres
        if not isinstance(ref, torch.Tensor):
            raise GaussianValidationError(f"centres must be a torch.Tensor, got {type(ref).__name__}")
        if ref.dim() != 3 or ref.shape[-1] != 3:
            raise GaussianValidationError(f"centres must have shape [B, k, 3], got {list(ref.shape)}")
        batch, k = ref.shape[:2]
        for name in ("centres", "scales", "quaternions", "intensities"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor):
                raise GaussianValidationError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            want = [batch, k, expected_last[name]] if name in expected_last else [batch, k]
            if list(t.shape) != want:
                raise GaussianValidationError(f"{name} must have shape {want} (B={batch}, k={k}), got {list(t.shape)}")
            if not t.is_floating_point():
                raise GaussianValidationError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
            if t.dtype != ref.dtype:
                raise GaussianValidationError(f"{name} has dtype {t.dtype} but centres has {ref.dtype}; all parameters must share one dtype")
            if t.device != ref.device:
                raise GaussianValidationError(f"{name} is on {t.device} but centres is on {ref.device}; all parameters must share one device")
            if t.numel() and not bool(torch.isfinite(t.detach()).all()):
                raise GaussianValidationError(f"{name} contains NaN or inf values")
        if self.scales.numel() and bool((self.scales.detach() <= 0).any()):
            raise GaussianValidationError(f"scales must be strictly positive; min is {float(self.scales.detach().min()):.3g}")
        if self.quaternions.numel() and bool((self.quaternions.detach().norm(dim=-1) < 1e-12).any()):
            raise GaussianValidationError("quaternions contains a zero quaternion, which has no rotation")
        return self

    # -------------------------------------------------------------- properties
    @property
    def batch_size(self) -> int:
        return self.centres.shape[0]

    @property
    def num_gaussians(self) -> int:
        return self.centres.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.centres.dtype

    @property
    def device(self) -> torch.device:
        return self.centres.device

    def unit_quaternions(self) -> torch.Tensor:
        return self.quaternions / self.quaternions.norm(dim=-1, keepdim=True)

    def rotations(self) -> torch.Tensor:
        """``[B, k, 3, 3]``."""
        return quaternion_to_rotation(self.quaternions)

    def covariances(self) -> torch.Tensor:
        """``[B, k, 3, 3]``."""
        return covariance_from(self.scales, self.quaternions)

    def precisions(self) -> torch.Tensor:
        """``[B, k, 3, 3]``."""
        return precision_from(self.scales, self.quaternions)

    # ------------------------------------------------------------- conversion
    def tensors(self) -> Iterator[torch.Tensor]:
        return (getattr(self, f.name) for f in fields(self))

    def map(self, fn) -> "GaussianSet":
        """Apply ``fn`` to every parameter tensor, e.g. ``gs.map(lambda t: t.detach())``."""
        return GaussianSet(*(fn(t) for t in self.tensors()))

    def to(self, *args, **kwargs) -> "GaussianSet":
        return self.map(lambda t: t.to(*args, **kwargs))

    def detach(self) -> "GaussianSet":
        return self.map(lambda t: t.detach())

    def __getitem__(self, index) -> "GaussianSet":
        """Index the batch dimension, keeping it: ``gs[0]`` has batch size 1."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return self.map(lambda t: t[index])

    def select(self, keep: torch.Tensor) -> "GaussianSet":
        """Keep Gaussians by a boolean or index tensor over k (applied to every batch item)."""
        return self.map(lambda t: t[:, keep])

    def to_flat(self) -> torch.Tensor:
        """``[B, k, 11]``: centre 3, scale 3, quaternion 4, intensity 1."""
        return torch.cat([self.centres, self.scales, self.quaternions, self.intensities[..., None]], dim=-1)

    @classmethod
    def from_flat(cls, flat: torch.Tensor) -> "GaussianSet":
        if flat.dim() != 3 or flat.shape[-1] != PARAMS_PER_GAUSSIAN:
            raise GaussianValidationError(f"flat Gaussian tensor must have shape [B, k, 11], got {list(flat.shape)}")
        return cls(flat[..., 0:3], flat[..., 3:6], flat[..., 6:10], flat[..., 10])

    @classmethod
    def cat(cls, sets: list["GaussianSet"], dim: int = 1) -> "GaussianSet":
        """Concatenate along k (``dim=1``) or along the batch (``dim=0``)."""
        if not sets:
            raise GaussianValidationError("cat needs at least one GaussianSet")
        return cls(*(torch.cat(group, dim=dim) for group in zip(*(list(s.tensors()) for s in sets))))

    @classmethod
    def isotropic(cls, centres: torch.Tensor, sigma: torch.Tensor | float, intensities: torch.Tensor) -> "GaussianSet":
        """Axis-aligned isotropic Gaussians; ``centres [B, k, 3]``."""
        sigma_t = torch.as_tensor(sigma, dtype=centres.dtype, device=centres.device)
        scales = sigma_t.expand(centres.shape[:-1]).unsqueeze(-1).expand(centres.shape).clone()
        quats = torch.zeros(centres.shape[:-1] + (4,), dtype=centres.dtype, device=centres.device)
        quats[..., 0] = 1
        return cls(centres, scales, quats, intensities)

    @classmethod
    def random(cls, batch: int, k: int, *, sigma_range: tuple[float, float] = (0.02, 0.1),
               generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> "GaussianSet":
        """Random test/benchmark Gaussians: centres uniform, sigma log-uniform, random rotations."""
        g = generator
        centres = torch.rand(batch, k, 3, generator=g, dtype=torch.float64)
        lo, hi = torch.log(torch.tensor(sigma_range, dtype=torch.float64))
        scales = torch.exp(lo + (hi - lo) * torch.rand(batch, k, 3, generator=g, dtype=torch.float64))
        quats = torch.randn(batch, k, 4, generator=g, dtype=torch.float64)
        quats = quats / quats.norm(dim=-1, keepdim=True)
        intens = 0.2 + 0.8 * torch.rand(batch, k, generator=g, dtype=torch.float64)
        return cls(centres, scales, quats, intens).to(dtype=dtype, device=device)
