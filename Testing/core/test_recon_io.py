"""Projection data: file format round trips, the real tooth scan, simulation, and clear errors."""
import math

import numpy as np
import pytest
import torch

from medgmae_core.recon.data_exchange import estimate_rotation_centre, load_data_exchange, normalise_counts
from medgmae_core.recon.projection_data import ProjectionData
from medgmae_core.recon.projection_file import load_projections, save_projections
from medgmae_core.recon.simulation import MU_WATER, add_poisson_noise, load_ct_volume, simulate_scan
from medgmae_core.xray.geometry import ConeBeam, GeometryError, ParallelBeam


@pytest.fixture(scope="module")
def tooth_path(shared_ct):
    return shared_ct / "tomography" / "tomopy_tooth.h5"


def _cone_data(views=8):
    shape = (10, 12, 6)
    geom = ConeBeam.for_volume(shape, 2.0, views)
    proj = torch.rand(views, *geom.detector_shape)
    ref = torch.rand(*shape)
    return ProjectionData(proj, geom, shape, reference=ref, affine=np.diag([2.0, 2.0, 2.0, 1.0]), mu_water=MU_WATER)


@pytest.mark.parametrize("suffix", [".npz", ".h5"])
def test_format_roundtrip(tmp_path, suffix):
    data = _cone_data()
    path = save_projections(tmp_path / f"scan{suffix}", data)
    back = load_projections(path)
    g0, g1 = data.geometry, back.geometry
    assert isinstance(g1, ConeBeam) and g1.detector_shape == g0.detector_shape
    assert torch.allclose(g1.angles, g0.angles) and g1.volume_extent_mm == pytest.approx(g0.volume_extent_mm)
    assert g1.source_to_origin == pytest.approx(g0.source_to_origin)
    assert g1.source_to_detector == pytest.approx(g0.source_to_detector)
    assert torch.equal(back.projections, data.projections) and torch.equal(back.reference, data.reference)
    assert back.volume_shape == data.volume_shape and back.mu_water == pytest.approx(MU_WATER)
    assert np.allclose(back.affine, data.affine)


def test_bad_files_are_rejected_clearly(tmp_path):
    data = _cone_data()
    good = {"projections": data.projections.numpy(), "angles": data.geometry.angles.numpy(), "geometry": "cone",
            "detector_spacing": np.array(data.geometry.detector_spacing), "volume_shape": np.array(data.volume_shape),
            "volume_extent_mm": np.array(data.geometry.volume_extent_mm), "source_to_origin": 100.0,
            "source_to_detector": 200.0}

    def write(name, **changes):
        d = {**good, **changes}
        d = {k: v for k, v in d.items() if v is not None}
        np.savez(tmp_path / name, **d)
        return tmp_path / name

    with pytest.raises(GeometryError, match="angles"):
        load_projections(write("a.npz", angles=good["angles"][:-1]))
    with pytest.raises(GeometryError, match="source_to_origin"):
        load_projections(write("b.npz", source_to_origin=0.0))
    with pytest.raises(GeometryError, match="too small"):
        load_projections(write("c.npz", projections=good["projections"][:, :, :5],
                               detector_spacing=np.array([4.0, 0.5])))
    with pytest.raises(GeometryError, match="missing geometry field"):
        load_projections(write("d.npz", source_to_detector=None))
    with pytest.raises(ValueError, match="missing 'projections'"):
        load_projections(write("e.npz", projections=None))
    with pytest.raises(GeometryError, match="'parallel' or 'cone'"):
        load_projections(write("f.npz", geometry="fan"))
    with pytest.raises(FileNotFoundError):
        load_projections(tmp_path / "nothing.npz")
    with pytest.raises(ValueError, match="unknown projection file type"):
        load_projections(write("g.npz").rename(tmp_path / "g.txt"))
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match="junk.h5"):
        load_projections(tmp_path / "junk.h5")


def test_normalisation_is_safe():
    white = np.full((2, 1, 4), 1000.0)
    dark = np.full((2, 1, 4), 100.0)
    data = np.array([[[550.0, 100.0, 50.0, 1000.0]]])
    p = normalise_counts(data, white, dark)
    assert p[0, 0, 0] == pytest.approx(math.log(2), rel=1e-6)  # half the flat field
    assert np.isfinite(p).all() and p[0, 0, 1] == pytest.approx(-math.log(1e-4), rel=1e-5)  # at/below dark: clamped
    assert p[0, 0, 3] == pytest.approx(0.0, abs=1e-7)
    white[:, 0, 2] = 100.0  # a dead flat-field pixel
    assert normalise_counts(data, white, dark)[0, 0, 2] == 0.0
    with pytest.raises(ValueError, match="do not match"):
        normalise_counts(data, white[..., :3], dark)


def test_tooth_loads_and_normalises(tooth_path):
    data = load_data_exchange(tooth_path, bin_cols=4)
    assert data.projections.shape == (181, 2, 160)
    assert data.geometry.n_views == 181 and isinstance(data.geometry, ParallelBeam)
    assert float(data.geometry.angles[-1]) == pytest.approx(math.radians(179.0055), abs=1e-4)
    p = data.projections
    # background (outside the tooth's shadow) near zero, the tooth around 1-2
    assert abs(float(p[:, :, :20].mean())) < 0.03 and 1.0 < float(p.max()) < 3.0
    centre = data.meta["rotation_centre_column"]
    assert centre == pytest.approx(295.5, abs=1.5)  # auto-centring finds the off-centre axis (not 319.5)
    assert data.geometry.axis_column * 4 + 1.5 == pytest.approx(centre, abs=1e-6)
    fixed = load_data_exchange(tooth_path, centre=295.5, bin_cols=1, grid_size=64)
    assert fixed.geometry.axis_column == pytest.approx(295.5) and fixed.volume_shape == (64, 64, 2)
    with pytest.raises(GeometryError, match="outside the detector"):
        load_data_exchange(tooth_path, centre=700)
    # the sinusoid fit recovers a known centre on a synthetic point object
    angles = np.linspace(0, np.pi, 90, endpoint=False)
    cols = np.arange(100)
    track = 40.0 + 15 * np.cos(angles + 0.3)
    sino = np.exp(-0.5 * ((cols[None] - track[:, None]) / 1.5) ** 2)
    assert estimate_rotation_centre(sino, angles) == pytest.approx(40.0, abs=0.05)


def test_simulation_of_real_ct_and_noise(small_real_ct):
    hu, affine = load_ct_volume(small_real_ct, crop="30:94,20:84,8:16", downsample=2)
    assert hu.shape == (32, 32, 4) and np.allclose(np.abs(np.diag(affine)[:3]), 6.0)
    mu = np.clip(MU_WATER * (1 + hu / 1000), 0, None).astype(np.float32)
    clean = simulate_scan(mu, (6.0, 6.0, 6.0), geometry="parallel", views=12)
    assert clean.projections.shape[0] == 12 and clean.reference is not None
    assert float(clean.projections.max()) > 1.0  # ~ path through the body x 0.02 / mm
    noisy = simulate_scan(mu, (6.0, 6.0, 6.0), geometry="parallel", views=12, noise_i0=1e4, seed=1)
    diff = noisy.projections - clean.projections
    z = diff * torch.sqrt(1e4 * torch.exp(-clean.projections))  # Poisson: std(p) ~ 1 / sqrt(I0 exp(-p))
    assert float(z.std()) == pytest.approx(1.0, abs=0.1) and abs(float(z.mean())) < 0.1
    with pytest.raises(ValueError, match="I0"):
        add_poisson_noise(clean.projections, 0.0)
    with pytest.raises(ValueError, match="geometry"):
        simulate_scan(mu, 6.0, geometry="fan")
    with pytest.raises(ValueError, match="crop"):
        load_ct_volume(small_real_ct, crop="0:500,:,:")
