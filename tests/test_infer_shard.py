"""Sharded inference: params placed on a data × fsdp × tensor mesh with the training rules give the one-device
results (f32: latents ≤ 1e-5, the same greedy ids, images within one uint8 level); the Inferencer runs on the
params' own mesh; host inputs become replicated global arrays and results come back as numpy."""

from __future__ import annotations

import sys

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


EVALS = dict(vqa=dict(type="shapes_vqa", num_examples=3))


@pytest.mark.slow  # the untrained init and the 8-device programs compile: ~28 CPU-s
def test_eval_runner_shards_the_run_and_scores_as_one_device(tmp_path, monkeypatch):
    """``python -m bagel_jax.eval.runner --workdir=RUN --config.parallel.*``: the run's params are sharded on the
    mesh of ``parallel`` (8 devices: data 2 × fsdp 2 × tensor 2), and its scores and answers equal those of the same
    params on one device; a mesh that does not fit the devices is a ConfigError naming ``parallel`` before any
    weights load."""
    from bagel_jax.config import ConfigError
    from bagel_jax.eval import runner
    from bagel_jax.eval.inferencer_fns import inferencer_fns
    from bagel_jax.infer import from_workdir
    from bagel_jax.train.workdir import prepare_workdir

    config = lib.tiny_config()
    config.data.synthetic_examples = 16
    workdir = str(tmp_path / "run")
    prepare_workdir(config, workdir)
    evals = tmp_path / "evals.py"
    evals.write_text(
        f"from bagel_jax.config import base_config\n\n\ndef get_config():\n    c = base_config()\n"
        f"    c.evals = {EVALS!r}\n    return c\n"
    )
    made = []
    real = from_workdir.run_inferencer
    monkeypatch.setattr(from_workdir, "run_inferencer", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    argv = ["runner", f"--workdir={workdir}", "--params=untrained", f"--config={evals}"]

    def main(*overrides):  # config_flags finds the --config.* override flags in sys.argv
        monkeypatch.setattr(sys, "argv", argv + list(overrides))
        return runner.main(sys.argv)

    with pytest.raises(ConfigError, match="parallel"):
        main("--config.parallel.data=3")
    assert not made
    sharded = main("--config.parallel.data=2", "--config.parallel.fsdp=2", "--config.parallel.tensor=2")
    (inf,) = made
    assert inf.placement.mesh.size == 8 and dict(inf.placement.mesh.shape)["tensor"] == 2
    assert any(leaf.sharding.spec != P() for leaf in jax.tree.leaves(inf.params)), "no param was sharded"
    run = from_workdir.load_run_config(workdir)
    one_device = Inferencer(inf.model, jax.device_get(inf.params), inf.tokenizer, run.data)  # the same params
    assert one_device.placement.mesh.size == 1
    evaluators = runner.build_evaluators(EVALS)
    single = runner.run_evals(evaluators, **inferencer_fns(one_device))
    assert set(single) == set(sharded)
    for k, v in single.items():
        if not k.endswith("/seconds"):
            assert sharded[k] == v, (k, sharded[k], v)
    # the untrained model scores 0: its answers themselves (greedy, 32 tokens each) must agree
    questions = [(e.render(), e.question) for e in evaluators["vqa"].evaluator.examples]
    answers = [inferencer_fns(i)["answer_fn"].batch(*zip(*questions)) for i in (inf, one_device)]
    assert answers[0] == answers[1] and len(set(answers[0])) > 1, answers
