# Benchmarks of issue 6; see benchmarks/RESULTS.md for the tables and how each number was taken.
# `make bench` runs every CPU case (about 8 minutes on 2 cores); `make bench-gpu` the GPU case.
PYTHON ?= python
ROUNDS ?= 5

.PHONY: bench bench-gpu
bench:
	$(PYTHON) benchmarks/mlp.py --preset tiny --rounds $(ROUNDS)
	$(PYTHON) benchmarks/gan.py --rounds $(ROUNDS)
	$(PYTHON) benchmarks/ddp.py --rounds $(ROUNDS)
	$(PYTHON) benchmarks/startup.py --rounds 7
	$(PYTHON) benchmarks/memory.py --rounds 3
	$(PYTHON) benchmarks/mlp.py --preset large --rounds $(ROUNDS)

bench-gpu:
	$(PYTHON) benchmarks/gpt.py --rounds $(ROUNDS)
	$(PYTHON) benchmarks/mlp.py --preset tiny --rounds $(ROUNDS)
