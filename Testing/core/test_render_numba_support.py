"""numba_support: fast exp helpers, cache-dir fallback, and the renderer without numba."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from medgmae_core import numba_support as ns

needs_numba = pytest.mark.skipif(not ns.numba_available(), reason="numba missing")


@needs_numba
def test_fast_exp_helpers_are_accurate():
    @ns.njit(cache=False)
    def apply(xs, out32, consts32):
        for i in range(xs.size):
            out32[i] = ns.poly_exp32(np.float32(xs[i] / 32.0), consts32[0], consts32[1], consts32[2],
                                     consts32[3], consts32[4])
        return out32

    @ns.njit(cache=False)
    def apply64(xs, out):
        for i in range(xs.size):
            out[i] = ns.fast_exp(xs[i])
        return out

    xs = np.linspace(-4.5, 0.0, 20001)
    rel64 = np.abs(apply64(xs, np.empty_like(xs)) / np.exp(xs) - 1).max()
    assert rel64 < 1e-6
    out32 = apply(xs, np.empty(xs.size, np.float32), ns.exp_constants(np.float32))
    assert np.abs(out32 / np.exp(xs) - 1).max() < 3e-6
    assert apply64(np.array([-200.0]), np.empty(1))[0] == 0.0  # far tail clamps to 0, not garbage


@needs_numba
def test_exp_quadratic_line_recurrence_matches_exp():
    @ns.njit(cache=False)
    def line(a, b, c, n, out):
        return ns.exp_quadratic_line(a, b, c, n, out)

    a, b, c, n = -0.011, 0.23, -2.5, 45
    j = np.arange(n)
    got = line(a, b, c, n, np.empty(n))
    np.testing.assert_allclose(got, np.exp(a * j * j + b * j + c), rtol=1e-12)
    got32 = line(np.float32(a), np.float32(b), np.float32(c), n, np.empty(n, np.float32))
    np.testing.assert_allclose(got32, np.exp(a * j * j + b * j + c), rtol=1e-5)


def test_cache_dir_falls_back_to_a_user_dir_when_package_dir_is_read_only(monkeypatch, tmp_path):
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setattr(ns.Path, "home", classmethod(lambda cls: tmp_path))
    real = ns._writable
    monkeypatch.setattr(ns, "_writable", lambda p: False if ns.PACKAGE_DIR in (p, *p.parents) else real(p))
    chosen = ns.configure_numba_cache()
    assert chosen == str(tmp_path / ".cache" / "medgmae" / "numba")
    assert os.environ["NUMBA_CACHE_DIR"] == chosen and Path(chosen).is_dir()


def test_cache_dir_respects_user_choice_and_writable_package(monkeypatch, tmp_path):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "mine"))
    assert ns.configure_numba_cache() is None
    assert os.environ["NUMBA_CACHE_DIR"] == str(tmp_path / "mine")
    monkeypatch.delenv("NUMBA_CACHE_DIR")
    monkeypatch.setattr(ns, "_writable", lambda p: True)
    assert ns.configure_numba_cache() is None
    assert "NUMBA_CACHE_DIR" not in os.environ


def test_disable_switch(monkeypatch):
    monkeypatch.setenv("MEDGMAE_DISABLE_NUMBA", "1")
    assert not ns.numba_available()
    assert "MEDGMAE_DISABLE_NUMBA" in ns.numba_unavailable_reason()


def test_renderer_works_when_numba_cannot_be_imported(repo_root):
    """A fresh interpreter where ``import numba`` fails: auto picks the torch path and it renders."""
    script = textwrap.dedent("""
        import sys
        sys.modules["numba"] = None  # makes `import numba` raise ImportError
        import torch
        from medgmae_core.gaussians import GaussianSet
        from medgmae_core.numba_support import numba_available, numba_unavailable_reason
        from medgmae_core.render import render_reference, render_volume, resolve_backend
        assert not numba_available() and "numba" in numba_unavailable_reason()
        g = GaussianSet.random(1, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        assert resolve_backend(g) == "torch"
        out = render_volume(g, (10, 9, 8))
        assert torch.allclose(out, render_reference(g, (10, 9, 8)), atol=1e-10)
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("MEDGMAE_RENDER_BACKEND", "MEDGMAE_DISABLE_NUMBA")}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=repo_root, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().endswith("ok")
