"""The ViT stage (bagel_jax/train/vit_train.py): the scene rows and their cell labels, a short real run whose
held-out accuracy rises, the export (a transformers SiglipVisionModel checkpoint, checked against transformers)
and its load into a Bagel TrainState (``model.vit.init_from``)."""

import json
import os

import jax
import numpy as np
import pytest
import torch
from transformers import SiglipVisionModel

from bagel_jax.config import ConfigError
from bagel_jax.convert import vit_export
from bagel_jax.data import images as img_lib
from bagel_jax.data.builders import synthetic_shapes as shapes
from bagel_jax.model.siglip import SiglipNaViT
from bagel_jax.train import vit_train
from configs_util import shipped_config

STEPS = 60


def tiny_vit_config():
    c = shipped_config("tiny_vit")
    c.data.update(batch_size=16, synthetic_examples=400)
    c.train.update(steps=STEPS, warmup_steps=5, log_every=10, checkpoint_every=STEPS)
    c.vit_stage.update(eval_every=0, eval_images=64, eval_batch=32)
    return c


@pytest.mark.parametrize("interpolate_pos", [False, True])
def test_scene_rows_match_the_pipeline_and_label_every_cell(interpolate_pos):
    config = tiny_vit_config()
    config.model.interpolate_pos = interpolate_pos  # the position ids follow the model's rule, as in BAGEL's rows
    fn = vit_train._scenes(config, config.data.seed)
    gen = shapes.Generator(config.data.seed, square=config.data.synthetic_square)
    p, side = config.model.vit.patch_size, config.model.vit_max_num_patch_per_side
    max_patches = (config.data.vit_transform[0] // p) ** 2  # the longest side fits the rule's max size
    for i in range(6):
        row = fn(i)
        objs, w, h = gen.t2i_scene(i)
        pixels = img_lib.resize(
            np.asarray(shapes.render(objs, w, h)), img_lib.ResizeRule.from_tuple(config.data.vit_transform)
        )
        n = (pixels.shape[0] // p) * (pixels.shape[1] // p)
        assert row["patches"].shape == (max_patches, p * p * 3) and row["image"].sum() == n
        np.testing.assert_array_equal(row["patches"][:n], img_lib.patchify(pixels, p))  # what BAGEL's ViT sees
        np.testing.assert_array_equal(
            row["pos"][:n], img_lib.flattened_position_ids(*pixels.shape[:2], p, side, interpolate_pos)
        )
        assert set(row["cell"][:n]) == set(range(9))  # every grid cell owns patches
        for o in objs:  # the object's colour dominates the non-background pixels of its cell's patches
            shape_ids, color_ids = shapes.cell_labels(objs)
            assert (
                shapes.SHAPES[shape_ids[o.cell] - 1] == o.shape
                and list(shapes.COLORS)[color_ids[o.cell] - 1] == o.color
            )
            px = row["patches"][:n][row["cell"][:n] == o.cell].reshape(-1, 3).astype(int)
            fg = px[np.abs(px - (245, 245, 240)).sum(-1) > 60]
            assert np.abs(np.median(fg, 0) - shapes.COLORS[o.color]).max() < 40, (o, np.median(fg, 0))
        empty = set(range(9)) - {o.cell for o in objs}
        assert all(shapes.cell_labels(objs)[0][c] == 0 for c in empty)


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    config = tiny_vit_config()
    workdir = str(tmp_path_factory.mktemp("vit_stage"))
    model, init_fn = vit_train.make_vit_init_fn(config)
    init = vit_train.CellEval(model, config)(jax.jit(init_fn)(jax.random.PRNGKey(config.train.seed)))
    result = vit_train.train_vit(config, workdir)
    return config, workdir, init, result


def test_stage_learns_and_exports(vit_run):
    config, workdir, init, result = vit_run
    # 60 steps of 16 scenes: held-out accuracy on the cells that hold an object (shape and colour both right;
    # chance 1/18) rises from ~0 (random heads) to well above chance (measured: object 0.03 → 0.55, all cells
    # 0.007 → 0.90, where always answering "empty" would score 0.78)
    assert init["object_acc"] < 0.1 and result["eval/object_acc"] > 0.4, (init, result)
    assert result["eval/cell_acc"] > 0.85, result
    export = os.path.join(workdir, "export")
    assert sorted(os.listdir(export)) == ["config.json", "model.safetensors", "vit_stage.json"]
    info = json.load(open(os.path.join(export, "vit_stage.json")))
    assert info["step"] == STEPS and info["object_acc"] == result["eval/object_acc"]


def test_export_is_a_transformers_siglip_checkpoint(vit_run):
    config, workdir, _, _ = vit_run
    hf = SiglipVisionModel.from_pretrained(os.path.join(workdir, "export"), attn_implementation="eager").eval()
    side, p = config.model.vit_max_num_patch_per_side, config.model.vit.patch_size
    image = np.asarray(shapes.render(shapes.Generator(3).t2i_scene(0)[0], side * p, side * p))  # a native square
    x = image.astype(np.float32) / 127.5 - 1.0
    with torch.no_grad():
        want = hf(torch.from_numpy(x).permute(2, 0, 1)[None]).last_hidden_state[0].numpy()
    params = vit_export.load_vit_params(workdir, config.model)
    patches = img_lib.patchify(image, p).astype(np.float32) / 127.5 - 1.0
    pos = img_lib.flattened_position_ids(side * p, side * p, p, side)
    got = SiglipNaViT(config.model).apply(
        {"params": params}, patches[None], pos[None], np.ones((1, len(pos)), np.int32)
    )[0]
    err = np.abs(np.asarray(got) - want).max() / np.abs(want).max()
    assert err < 1e-5, err


def test_bagel_loads_the_stage_and_untrained_baseline_keeps_it(vit_run):
    """load_vit_params + with_pretrained (the BAGEL stage's hook on a fresh start) puts the export in params and EMA,
    sharded, and leaves everything else alone."""
    from bagel_jax.model.bagel import make_init_fn
    from bagel_jax.parallel.mesh import logical_rules, make_mesh
    from bagel_jax.train.optim import make_optimizer
    from bagel_jax.train.state import abstract_state, state_shardings, with_pretrained

    vit_config, workdir, _, _ = vit_run
    config = shipped_config("tiny_repro")
    config.model.vit.init_from = workdir
    vit_export.check_vit_init(config)
    devices = jax.devices()[:2]
    mesh, rules = make_mesh(config, devices), logical_rules(config)
    _, init_fn = make_init_fn(config)
    optimizer, _ = make_optimizer(config.train, jax.eval_shape(init_fn, jax.random.PRNGKey(0)))
    shardings = state_shardings(init_fn, optimizer, mesh, rules)
    rng = np.random.default_rng(0)
    state = jax.tree.map(
        lambda s: jax.device_put(rng.standard_normal(s.shape).astype(s.dtype), s.sharding),
        abstract_state(init_fn, optimizer, mesh, rules),
    )
    before = jax.tree.map(np.asarray, state.params)
    loaded = vit_export.load_vit_params(workdir, config.model)
    new = with_pretrained(state, shardings, "vit_model", loaded, "model.vit.init_from")
    for tree in (new.params["vit_model"], new.ema_params["vit_model"]):
        for a, b, s in zip(
            jax.tree.leaves(tree), jax.tree.leaves(loaded), jax.tree.leaves(shardings.params["vit_model"])
        ):
            np.testing.assert_array_equal(np.asarray(a), b)
            assert a.sharding == s
    for key in before:
        if key != "vit_model":
            jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, new.params[key]), before[key])


def test_bad_config_and_init_from_errors_name_the_key(vit_run, tmp_path):
    _, workdir, _, _ = vit_run
    c = tiny_vit_config()
    c.vit_stage.eval_seed = c.data.seed
    with pytest.raises(ConfigError, match="^vit_stage.eval_seed: "):
        vit_train.validate_vit_config(c)
    c = tiny_vit_config()
    c.data.synthetic_examples = 0
    with pytest.raises(ConfigError, match="^data.synthetic_examples: "):
        vit_train.validate_vit_config(c)
    c = shipped_config("tiny_repro")
    c.model.vit.init_from = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="^model.vit.init_from: "):
        vit_export.check_vit_init(c)
    c.model.vit.init_from = workdir
    c.model.vit.hidden_size = 32
    with pytest.raises(ConfigError, match="^model.vit.init_from: .*shape"):
        vit_export.load_vit_params(workdir, c.model)
