# Two entry points for a fresh machine:
#   make demo   set up .venv and run the main job on the built-in phantom
#   make test   set up .venv (with test tools) and run the whole test suite
.PHONY: setup setup-dev demo test bench

setup:
	scripts/setup.sh

setup-dev:
	scripts/setup.sh --dev

demo: setup
	.venv/bin/medgmae demo --out demo_out

test: setup-dev
	.venv/bin/python -m pytest -q Testing

bench: setup-dev
	mkdir -p bench_out
	.venv/bin/python benchmarks/render.py --out bench_out/render.json
