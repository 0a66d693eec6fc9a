PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?= -n 2 --dist loadfile
# XLA's CPU runtime allocates every step's temporaries afresh (the trainer splits them into
# heaps of at most 16 MiB, ferret_jax/compiler.py). malloc serves blocks up to 32 MiB from its
# heap and keeps freed memory instead of returning it to the kernel, which would fault it in again
# on the next step. BENCHMARKS.md, "malloc and huge pages".
export GLIBC_TUNABLES ?= glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296

.PHONY: install test demo bench clean

$(VENV)/.installed: pyproject.toml requirements.txt requirements-convert.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# torch (CPU) goes in before anything that could pull a CUDA build of it.
	$(PY) -m pip install -r requirements-convert.txt -r requirements.txt
	$(PY) -m pip install -e ".[convert,test]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# Trains the three stages of the demo config on the synthetic world (CPU), evaluates on held-out
# scenes, writes demo_out/results.json and demo_out/grounded.png.
demo: install
	$(PY) -m ferret_jax.demo --out demo_out

bench: install
	$(PY) benchmarks/bench_backbones.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info demo_out
