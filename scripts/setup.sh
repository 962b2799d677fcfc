#!/usr/bin/env bash
# Create .venv at the repo root and install medgmae-core with its extras.
# Usage: scripts/setup.sh [--dev]   (--dev adds test tools, the viewer, the system EGL libs and chromium)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="slicer"
if [ "${1:-}" = "--dev" ]; then
  extras="slicer,viewer,dev"
  # Offscreen VTK rendering needs EGL/Mesa; install it when we can (root, Debian).
  if ! ldconfig -p 2>/dev/null | grep -q libEGL.so.1 && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libegl1 libgl1-mesa-dri >/dev/null) \
      || echo "warning: could not install libegl1/libgl1-mesa-dri; offscreen rendering tests will be skipped" >&2
  fi
  # The viewer's browser tests drive a real headless Chromium through Selenium (chromium-driver).
  if ! { command -v chromium >/dev/null && command -v chromedriver >/dev/null; } && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
      || echo "warning: could not install chromium/chromium-driver; the viewer's browser tests will be skipped" >&2
  fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# Pinned first so nothing else can pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[${extras}]"
