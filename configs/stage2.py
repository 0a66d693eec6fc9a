"""Stage 2: high-resolution dense alignment (trains proj_global, proj_local, sampler).

    python -m ferret_jax.train --config=configs/stage2.py[:size=7b|13b|demo|tiny] --workdir=DIR
"""

from ferret_jax import config_lib


def get_config(arg=None):
    return config_lib.stage_config(2, arg)
