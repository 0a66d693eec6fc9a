PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?= -n 2 --dist loadfile
# XLA's CPU runtime allocates every step's buffers afresh; where Linux keeps transparent huge
# pages for `madvise` callers only, malloc's memory is faulted in 4 KiB at a time each step (a
# quarter of a demo step's CPU time in the kernel). glibc >= 2.35 then asks for huge pages; older
# ones ignore it. BENCHMARKS.md, "malloc and huge pages".
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

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
