"""BAGEL-7B-MoT on TPU v6e (32 GiB per chip): one packed row per two chips.

Command (plan):
  python -m bagel_jax.aot --config=configs/bagel_7b_mot_v6e.py --topology=v6e:8x8 --step_time=10
  python -m bagel_jax.aot --config=configs/bagel_7b_mot_v6e.py:45k --topology=v6e:8x8 --step_time=10
Expected: mesh fsdp 32 × tensor 2; per chip 3.79 GiB arguments + 14.90 GiB temporaries = 18.69 GiB (45k:
          3.80 + 21.02 = 24.83 GiB) of 31.25 GiB → fits; compile ~5 min (45k: ~7 min) on a 2-core host.
Why:      two chips per row: tensor=2 splits heads, MLP and vocabulary over a chip pair (and the residual stream
          saved between layers). One row per chip also fits now (configs/bagel_7b_mot.py with remat=offload_input,
          README); this plan trades the tensor pair's collectives for half the rows. The batch is 32 rows on 64
          chips: set data.batch_size = chips / 2.
          model.scan_layers scans the 28 decoder layers (compile 2-13 instead of 15-18 min; XLA counts one layer's
          FLOPs, the planner multiplies each loop by its trip count).
"""

import os

from bagel_jax.launch_utils import load_config


def get_config(arg=None):
    base = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bagel_7b_mot.py")
    c = load_config(f"{base}:{arg}" if arg else base)
    c.name = "bagel_7b_mot_v6e"
    c.model.scan_layers = True
    c.parallel.update(fsdp=-1, tensor=2)
    c.data.batch_size = 32
    return c
