"""The frozen VAE encoder inside Bagel keeps the rows' batch sharding: no all-gather of image activations."""

from __future__ import annotations

import flax.linen as nn
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import bagel_testlib as lib
from bagel_jax.model.bagel import Bagel, dummy_batch
from bagel_jax.parallel.mesh import logical_rules, make_mesh


def test_encoder_activations_stay_on_their_rows_chips():
    config = lib.tiny_config()
    config.parallel.update(data=1, fsdp=8, tensor=1)
    config.data.batch_size = 8
    cfg = config.model
    mesh, rules = make_mesh(config, jax.devices()[:8]), logical_rules(config)
    model = Bagel(cfg)
    batch = dummy_batch(cfg, 8, vae_images=2, vae_hw=(32, 32))
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), batch, jax.random.key(1)))

    def encode(p, b):
        return model.apply(p, b, jax.random.key(2), method=Bagel.encode_latents)

    def spec(x, axes):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P(*axes)))

    p_abs = jax.tree.map(lambda x: spec(x, ()), nn.unbox(params))
    b_abs = jax.tree.map(lambda x: spec(x, ("fsdp",)), batch)  # rows over the 8 chips
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        hlo = jax.jit(encode).lower(p_abs, b_abs).compile().as_text()
    gathers = [line for line in hlo.splitlines() if "all-gather" in line and "vae.encode" in line]
    assert not gathers, gathers[:2]
