"""Stage 1: image-caption alignment (trains proj_global; global view only).

    python -m ferret_jax.train --config=configs/stage1.py[:size=7b|13b|demo|tiny] --workdir=DIR
"""

from ferret_jax import config_lib


def get_config(arg=None):
    return config_lib.stage_config(1, arg)
