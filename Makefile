# The two commands of the README's quickstart. Both set everything up first (idempotently).
.PHONY: setup demo test lint bench man

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

# Man pages generated from the CLI's own help (`orchestrator --help` stays the source), one per command:
# build/man/man1/orchestrator*.1 (`man -l build/man/man1/orchestrator-migrate.1`). deploy/setup.sh
# also installs them into .venv/share/man.
man:
	.venv/bin/python -m orchestrator.commands.manpages build/man/man1

# All benchmarks, one after the other, each on its own lab (over an hour on an idle 2-core machine:
# drain latency ~25 minutes, the RDMA survival matrix most of the rest); results in bench-results/.
bench: setup
	.venv/bin/python bench/drain_latency.py --vms 1,16 --events 1000 --json bench-results/drain_latency.json
	.venv/bin/python bench/rdma_survival.py --migrations 20
	.venv/bin/python bench/overhead.py
	.venv/bin/python bench/evacuation.py --json bench-results/evacuation.json
	.venv/bin/python bench/switchover_group.py --rounds 3
	.venv/bin/python bench/startup.py --json bench-results/startup.json
