# The two commands of the README's quickstart. Both set everything up first (idempotently).
.PHONY: setup demo test lint

setup:
	bash deploy/setup.sh

# The main job: bring up the lab and live-migrate a guest with simulated VFIO devices there and back.
demo: setup
	.venv/bin/orchestrator lab demo

# The whole test suite: lint, types, unit tests, and the lab tests on real libvirtd + QEMU.
test: setup lint
	.venv/bin/pytest -ra

lint:
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy orchestrator
