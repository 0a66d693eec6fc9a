"""Stage 3: intent-enhanced instruction tuning (trains everything).

    python -m ferret_jax.train --config=configs/stage3.py[:size=7b|13b|demo|tiny] --workdir=DIR
"""

from ferret_jax import config_lib


def get_config(arg=None):
    return config_lib.stage_config(3, arg)
