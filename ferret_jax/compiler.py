"""XLA compiler options for the jitted training steps.

XLA packs a step's temporaries into one allocation: ~190 MB for the demo's stage-III step. On
CPU that block comes from glibc's malloc, which serves any block over its mmap threshold (at
most 32 MiB) with a fresh `mmap` and returns it with `munmap`, so the kernel zero-fills the
step's whole working set on every call: ~50,000 page faults and a quarter of the step's CPU time
(BENCHMARKS.md, "malloc and huge pages"). Capping each of XLA's temporary heaps at 16 MiB keeps
them under the threshold; malloc then reuses the same memory from step to step. The cap only
splits buffer assignment into more allocations: the step computes the same numbers. A buffer
larger than the cap gets a heap of its own (XLA logs a warning for each at compile time).

XLA cannot serialize an executable with several temporary allocations, so where a persistent
compilation cache is configured (`jax_compilation_cache_dir`, as the tests do) the cache wins
and the steps keep XLA's single allocation.
"""

from __future__ import annotations

import jax

CPU_TEMP_HEAP_BYTES = 16 << 20


def _persistent_cache() -> bool:
    return bool(jax.config.jax_compilation_cache_dir)


def step_options(backend: str | None = None) -> dict[str, int] | None:
    """`compiler_options` for `jax.jit` of a training or evaluation step on `backend`
    (default: JAX's default backend); None where XLA's defaults stand (GPU, TPU, or CPU with a
    persistent compilation cache)."""
    if (backend or jax.default_backend()) != "cpu" or _persistent_cache():
        return None
    return {"xla_multiheap_size_constraint_per_heap": CPU_TEMP_HEAP_BYTES}
