"""Test setup: 8 forced CPU devices (before JAX starts) and tiny HF checkpoints built offline."""

import os
import tempfile

# Compiled programs go to an on-disk cache shared by this session's processes (pytest-xdist
# workers and the trainer subprocesses inherit the variable): the trainer tests compile the same
# step programs several times (resume, restarts), and the cache makes the repeats cheap.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="ferret_jax_xla_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

assert jax.device_count() == 8, "tests need 8 forced CPU devices: set XLA_FLAGS before importing jax"


def pytest_configure(config):
    config.addinivalue_line("markers", "torch: needs the optional `convert` extra (torch + transformers)")


@pytest.fixture(scope="session")
def hf():
    """The tiny-HF-checkpoint factory (skips the test when torch/transformers are missing)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tests import hf_models

    return hf_models
