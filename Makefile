# Benchmarks of issue 6; see benchmarks/RESULTS.md for the table and how each number was taken.
PYTHON ?= python
ROUNDS ?= 5

.PHONY: bench
bench:
	$(PYTHON) benchmarks/tiny_mlp.py --rounds $(ROUNDS)
	$(PYTHON) benchmarks/gan.py --rounds $(ROUNDS)
