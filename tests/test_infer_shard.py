"""Sharded inference: params placed on a data × fsdp × tensor mesh with the training rules give the one-device
results (f32: latents ≤ 1e-5, the same greedy ids, images within one uint8 level); the Inferencer runs on the
params' own mesh; host inputs become replicated global arrays and results come back as numpy."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import bagel_testlib as lib
from bagel_jax.infer.api import Inferencer
from bagel_jax.infer.context import interleave_contexts
from bagel_jax.infer.placement import Placement, place_params, placement_for, single_device
from bagel_jax.model.bagel import make_init_fn
from bagel_jax.parallel.mesh import logical_rules, make_mesh

T2I = dict(cfg_text_scale=4.0, cfg_img_scale=1.0, cfg_interval=(0.4, 1.0), cfg_renorm_type="global")


@pytest.fixture(scope="module")
def setup():
    config, cfg, params, model = lib.tiny_setup()
    config.parallel.update(data=2, fsdp=2, tensor=2)
    config.data.batch_size = 8
    placement = Placement(make_mesh(config), logical_rules(config))
    _, init_fn = make_init_fn(config)
    return dict(config=config, params=params, model=model, placement=placement, init_fn=init_fn)


def test_placement_puts_and_fetches(setup):
    placement = setup["placement"]
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    put = placement.put({"x": x, "none": None})
    assert put["none"] is None and put["x"].sharding.spec == P() and len(put["x"].sharding.device_set) == 8
    np.testing.assert_array_equal(placement.fetch(put)["x"], x)
    assert placement.put(put)["x"] is put["x"]  # already on the mesh: passed through
    one = single_device()
    assert one.mesh.size == 1 and placement_for({"w": x}).mesh.size == 1


def test_sharded_params_give_the_one_device_results(setup):
    tok = lib.CharTokenizer()
    placement, config = setup["placement"], setup["config"]
    sharded = place_params(setup["params"], setup["init_fn"], placement)
    specs = {leaf.sharding.spec for leaf in jax.tree.leaves(sharded)}
    assert any(s != P() for s in specs), "no param was sharded"
    many = Inferencer(setup["model"], sharded, tok, config.data, max_batch=4)
    assert many.placement.mesh is placement.mesh  # the params' own mesh
    one = Inferencer(setup["model"], setup["params"], tok, config.data, max_batch=4)
    assert one.placement.mesh.size == 1

    prompts, seeds = ["a red square", "two blue circles"], [3, 4]
    kw = dict(num_timesteps=4, **T2I)
    contexts = [interleave_contexts([p], many.pre) for p in prompts]
    a = one._image.sample(contexts, (32, 32), seeds, **kw)
    b = many._image.sample(contexts, (32, 32), seeds, **kw)
    np.testing.assert_allclose(b.latents, a.latents, atol=1e-5, rtol=0)
    img_a = one.generate_batch(prompts, seeds, (32, 32), **kw)
    img_b = many.generate_batch(prompts, seeds, (32, 32), **kw)
    for x, y in zip(img_a, img_b):
        assert np.abs(x.astype(int) - y.astype(int)).max() <= 1


@pytest.mark.slow
def test_sharded_text_decoding_gives_the_one_device_ids(setup):
    tok = lib.CharTokenizer()
    sharded = place_params(setup["params"], setup["init_fn"], setup["placement"])
    many = Inferencer(setup["model"], sharded, tok, setup["config"].data, max_batch=4)
    one = Inferencer(setup["model"], setup["params"], tok, setup["config"].data, max_batch=4)
    items = [["what is this"], ["two words"]]
    assert one.answer_ids_batch(items, max_length=6) == many.answer_ids_batch(items, max_length=6)
