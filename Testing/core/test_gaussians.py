import math

import pytest
import torch

from medgmae_core.gaussians import (GaussianSet, GaussianValidationError, covariance_from, precision_from,
                                    quaternion_to_rotation, rotation_to_quaternion)


def test_rotation_is_orthonormal_and_roundtrips():
    g = GaussianSet.random(3, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    rot = g.rotations()
    eye = torch.eye(3, dtype=torch.float64)
    assert torch.allclose(rot @ rot.transpose(-1, -2), eye.expand_as(rot), atol=1e-12)
    assert torch.allclose(torch.linalg.det(rot), torch.ones(3, 50, dtype=torch.float64), atol=1e-12)
    q = rotation_to_quaternion(rot)
    assert torch.allclose(quaternion_to_rotation(q), rot, atol=1e-12)


def test_quaternion_axis_convention():
    # 90 degrees about the third axis (w, x, y, z) = (cos45, 0, 0, sin45) maps axis 0 onto axis 1.
    q = torch.tensor([math.cos(math.pi / 4), 0, 0, math.sin(math.pi / 4)], dtype=torch.float64)
    rot = quaternion_to_rotation(q)
    assert torch.allclose(rot @ torch.tensor([1.0, 0, 0], dtype=torch.float64),
                          torch.tensor([0.0, 1, 0], dtype=torch.float64), atol=1e-12)


def test_covariance_and_precision_are_inverse():
    g = GaussianSet.random(2, 20, dtype=torch.float64)
    cov = covariance_from(g.scales, g.quaternions)
    prec = precision_from(g.scales, g.quaternions)
    assert torch.allclose(cov @ prec, torch.eye(3, dtype=torch.float64).expand_as(cov), atol=1e-9)
    assert torch.allclose(torch.linalg.det(cov), g.scales.prod(-1) ** 2, rtol=1e-9)


def test_flat_roundtrip_and_cat():
    g = GaussianSet.random(2, 7)
    flat = g.to_flat()
    assert flat.shape == (2, 7, 11)
    back = GaussianSet.from_flat(flat)
    assert torch.equal(back.quaternions, g.quaternions)
    both = GaussianSet.cat([g, g])
    assert both.num_gaussians == 14 and both.batch_size == 2
    assert g[1].batch_size == 1 and torch.equal(g[1].centres[0], g.centres[1])


def _good():
    return dict(centres=torch.rand(1, 4, 3), scales=torch.full((1, 4, 3), 0.1),
                quaternions=torch.tensor([[1.0, 0, 0, 0]]).repeat(4, 1)[None], intensities=torch.rand(1, 4))


@pytest.mark.parametrize("name,bad,msg", [
    ("centres", torch.rand(4, 3), "centres must have shape"),
    ("scales", torch.full((1, 4, 2), 0.1), "scales must have shape"),
    ("quaternions", torch.zeros(1, 4, 4), "zero quaternion"),
    ("scales", torch.zeros(1, 4, 3), "scales must be strictly positive"),
    ("scales", -torch.ones(1, 4, 3), "scales must be strictly positive"),
    ("intensities", torch.tensor([[1.0, float("nan"), 0, 0]]), "intensities contains NaN"),
    ("centres", torch.full((1, 4, 3), float("inf")), "centres contains NaN or inf"),
    ("intensities", torch.rand(1, 4, dtype=torch.float64), "intensities has dtype torch.float64"),
    ("intensities", torch.ones(1, 4, dtype=torch.int64), "intensities must be a floating-point"),
    ("intensities", torch.rand(1, 5), "intensities must have shape"),
])
def test_bad_inputs_name_the_argument(name, bad, msg):
    kwargs = _good()
    kwargs[name] = bad
    with pytest.raises(GaussianValidationError, match=msg):
        GaussianSet(**kwargs)


def test_device_mismatch_is_named():
    kwargs = _good()
    kwargs["scales"] = kwargs["scales"].to("meta")
    with pytest.raises(GaussianValidationError, match="scales is on meta"):
        GaussianSet(**kwargs)
