# Benchmarks of issues 6 and 16; see benchmarks/RESULTS.md for the tables and how each number was taken.
# `make bench` runs every CPU case (about 12 minutes on 2 cores); `make bench-gpu` the GPU case.
# LIGHTNING_PYTHON=/path/to/venv/bin/python adds PyTorch Lightning's column to the paired cases.
PYTHON ?= python
ROUNDS ?= 5
LIGHTNING_PYTHON ?=

.PHONY: bench bench-gpu
bench:
	$(PYTHON) benchmarks/overhead.py --rounds $(ROUNDS) $(if $(LIGHTNING_PYTHON),--lightning-python $(LIGHTNING_PYTHON))
	$(PYTHON) benchmarks/mlp.py --preset tiny --rounds $(ROUNDS)
	$(PYTHON) benchmarks/gan.py --rounds $(ROUNDS)
	$(PYTHON) benchmarks/ddp.py --rounds $(ROUNDS)
	$(PYTHON) benchmarks/startup.py --rounds 7
	$(PYTHON) benchmarks/memory.py --rounds 3
	$(PYTHON) benchmarks/mlp.py --preset large --rounds $(ROUNDS)

bench-gpu:
	$(PYTHON) benchmarks/gpt.py --rounds $(ROUNDS)
	$(PYTHON) benchmarks/mlp.py --preset tiny --rounds $(ROUNDS)
