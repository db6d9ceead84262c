"""``model.vae.encode_scan_mode="per_chip"`` (model/vae_per_chip.py): each chip encodes its own images by size in a
``shard_map``. Equal to the global slot scan (the oracle) and the one-call masked encode on every real image, on 8
CPU devices with rows holding different numbers and sizes of images; a whole Bagel step's outputs and gradients are
the oracle's; a chip whose images are all empty runs no encode while its neighbours do."""

from __future__ import annotations

import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import bagel_testlib as lib
from bagel_jax.config import ConfigError, validate
from bagel_jax.convert import bagel_ckpt
from bagel_jax.model.bagel import Bagel
from bagel_jax.model.vae import FluxVAE
from bagel_jax.model.vae_per_chip import encode_per_chip
from bagel_jax.parallel.mesh import logical_rules, make_mesh, use_mesh

CANVAS, F = 8, 1  # the small VAE below: ch_mult (1,) → f = 1, one level and the mid block (attention): quick to compile
ROWS_AXES = P(("data", "fsdp"))


def small_config(parallel, rows, **vae):
    config = lib.tiny_config()
    config.model.vae.update(ch=32, ch_mult=(1,), num_res_blocks=1, dtype="float32", encode="masked", **vae)
    config.parallel.update(data=1, fsdp=1, tensor=1, sequence=1)
    config.parallel.update(**(parallel or {}))
    config.data.batch_size = rows
    return config


def moments_fn(config, devices):
    """jitted (vae params, images [B, N, H, W, 3] uint8, hw) → Bagel.encode_moments under the config's mesh."""
    mesh = make_mesh(config, devices)
    model = Bagel(config.model)

    def run(p, x, hw):
        return model.apply({"params": {"vae": p}}, x, hw, method=Bagel.encode_moments)

    def call(p, x, hw):
        with use_mesh(mesh, logical_rules(config)):
            return jax.device_get(jax.jit(run)(p, jax.device_put(x, NamedSharding(mesh, ROWS_AXES)), hw))

    return call


def random_layout(rng, rows, slots):
    """hw int[rows, slots, 2]: each row its own number of images (0 to all), sizes from 2 px to the canvas (GroupNorm
    over one pixel would amplify f32 rounding by 1/sqrt(eps))."""
    hw = rng.integers(2, CANVAS + 1, (rows, slots, 2))
    hw[rng.random((rows, slots)) < 0.25] = CANVAS  # full-canvas images
    for r in range(rows):
        hw[r, rng.integers(0, slots + 1) :] = 0  # row r holds its first few slots only
    hw[rng.random((rows, slots)) < 0.15] = 0  # and a hole here and there
    return hw


def assert_equal_on_real(got, want, hw, what):
    flat = hw.reshape(-1, 2)
    for i, (h, w) in enumerate(flat):
        if h and w:
            for g, t in zip(got, want, strict=True):
                g, t = g[i, : h // F, : w // F], t[i, : h // F, : w // F]
                assert np.abs(g - t).max() <= 1e-5 * np.abs(t).max(), (what, i, (h, w), hw[..., 0].tolist())


@pytest.mark.parametrize(
    "parallel, rows, slots, vae",
    [
        (dict(data=2, fsdp=2, tensor=2), 4, 6, dict(encode_levels=1)),  # k = 2 slots per step: 1 image per chip
        (dict(fsdp=4, tensor=2), 4, 4, dict(encode_levels=2, reference_padding=True)),
        (None, 3, 4, dict(encode_levels=2)),  # one device, no mesh split: one plain call
    ],
)
def test_per_chip_equals_global_scan_and_one_call(parallel, rows, slots, vae):
    devices = jax.devices()[:8] if parallel else jax.devices()[:1]
    paths = {
        "per_chip": small_config(parallel, rows, encode_scan=True, encode_scan_mode="per_chip", **vae),
        "global": small_config(parallel, rows, encode_scan=True, encode_scan_mode="global", **vae),
        "one_call": small_config(parallel, rows, encode_scan=False, **vae),
    }
    fns = {name: moments_fn(c, devices) for name, c in paths.items()}
    vae_cfg = paths["global"].model.vae
    params = FluxVAE(vae_cfg).init(jax.random.key(0), jnp.zeros((1, CANVAS, CANVAS, 3)))["params"]
    rng = np.random.default_rng(sum(map(ord, str(parallel))))
    layouts = [random_layout(rng, rows, slots) for _ in range(4)]
    layouts[0][0] = 0  # one row without images, the others with some
    for hw in layouts:
        x = rng.integers(0, 256, (rows, slots, CANVAS, CANVAS, 3), dtype=np.uint8)
        got = {name: fn(params, x, hw) for name, fn in fns.items()}
        assert_equal_on_real(got["per_chip"], got["global"], hw, "per_chip vs global")
        assert_equal_on_real(got["per_chip"], got["one_call"], hw, "per_chip vs one call")
        empty = (hw[..., 0] == 0).reshape(-1)
        assert not any(np.asarray(t)[empty].any() for t in got["per_chip"])  # empty slots: zeros, not encoded
        assert all(np.isfinite(t).all() for t in got["per_chip"])


def test_the_skip_is_per_chip():
    """8 chips, 2 images each (chunk 1): a chip runs the encoder once per real image it holds and never for an
    empty one, whatever the other chips hold (the global scan runs a step wherever any row has that slot)."""
    config = small_config(dict(data=2, fsdp=2, tensor=2), 4)
    mesh = make_mesh(config, jax.devices()[:8])
    vae = FluxVAE(config.model.vae)
    params = vae.init(jax.random.key(0), jnp.zeros((1, CANVAS, CANVAS, 3)))["params"]
    runs = []

    def encode(p, x, hw):
        jax.debug.callback(lambda chip: runs.append(int(chip)), jax.lax.axis_index(("data", "fsdp", "tensor")))
        return vae.apply({"params": p}, x, hw, method=FluxVAE.encode)

    def per_chip(p, x, hw):
        return encode_per_chip(
            encode,
            p,
            x,
            hw,
            hw,
            axes=("data", "fsdp", "tensor"),
            downsample=F,
            z_channels=16,
            chunk=1,
        )

    # image i lives on chip i // 2: chip 0 none, chip 1 one, chip 2 two, chip 5 one, the rest none
    real = {2: (4, 4), 4: (8, 8), 5: (4, 6), 11: (8, 2)}
    hw = np.zeros((16, 2), np.int32)
    for i, size in real.items():
        hw[i] = size
    x = np.random.default_rng(0).uniform(-1, 1, (16, CANVAS, CANVAS, 3)).astype(np.float32)
    with use_mesh(mesh, logical_rules(config)):
        fn = jax.jit(per_chip)
        jaxpr = jax.make_jaxpr(fn)(params, x, hw).jaxpr
        mean, _ = jax.device_get(fn(params, x, hw))
        jax.effects_barrier()
    inside, outside = primitives_by_region(jaxpr)
    assert "cond" in inside and "cond" not in outside, (inside, outside)  # the skip / bucket switch is per chip
    assert sorted(runs) == [1, 2, 2, 5], runs
    alone = jax.jit(lambda p, x, hw: vae.apply({"params": p}, x, hw, method=FluxVAE.encode))(params, x, hw)[0]
    assert_equal_on_real((mean,), (np.asarray(alone),), hw, "per chip vs alone")


def primitives_by_region(jaxpr, inside=False, found=None):
    """({primitives inside a shard_map}, {primitives outside any}) of a jaxpr, nested jaxprs included."""
    found = found if found is not None else (set(), set())
    for eqn in jaxpr.eqns:
        found[0 if inside else 1].add(eqn.primitive.name)
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    primitives_by_region(sub, inside or eqn.primitive.name == "shard_map", found)
    return found


@pytest.fixture(scope="module")
def mixed_rows():
    """The tiny model with one decoder and one SigLIP layer (random release checkpoint), and four rows of its samples:
    6 (all), 0, 1 and 3 VAE images of 32×48, 32×32 and 48×32 pixels in 6 slots of a 48² canvas."""
    config = lib.tiny_config()
    config.model.update(num_layers=1)
    config.model.vit.update(num_layers=1)
    directory = tempfile.mkdtemp(prefix="bagel_per_chip_")
    bagel_ckpt.write_random_checkpoint(directory, config.model, seed=0)
    params = bagel_ckpt.load_params(directory, config.model)
    lay, budgets = lib.layout(config.model), lib.budgets()
    t2i, vlm, edit, inter = lib.documents(lib.four_samples(), lay)
    rows = [[t2i, vlm, edit, inter], [vlm], [t2i], [edit, vlm, t2i]]
    batch = lib.packed_batch(rows, budgets)
    _, noise = lib.image_noise(rows, budgets)
    counts = (np.asarray(batch.vae_hw)[..., 0] > 0).sum(1).tolist()
    assert counts == [6, 0, 1, 3], counts
    return config, params, batch, noise


def test_bagel_step_per_chip_equals_global(mixed_rows):
    """A whole loss + gradient on data 2 × fsdp 2 × tensor 2: per_chip = global (loss, every gradient, the CE and
    the velocities of every real gen token; padding tokens read an empty slot: zeros or a masked empty encode)."""
    config, params, batch, noise = mixed_rows
    results = {}
    for mode in ("per_chip", "global"):
        c = config.copy_and_resolve_references()
        c.parallel.update(data=2, fsdp=2, tensor=2)
        c.data.batch_size = 4
        c.model.vae.update(encode="masked", encode_scan=True, encode_scan_mode=mode)
        mesh, model = make_mesh(c, jax.devices()[:8]), Bagel(c.model, ce_chunk=64)

        def loss(p, bt, n, model=model):
            o = model.apply({"params": p}, bt, noise=n)
            mse = ((o["velocity_pred"] - o["velocity_target"]) ** 2).mean(-1) * o["mse_mask"]
            return (o["ce"] * (o["ce"] > 0)).sum() + mse.sum(), o

        with use_mesh(mesh, logical_rules(c)):
            bt = jax.device_put(batch, NamedSharding(mesh, ROWS_AXES))
            results[mode] = jax.device_get(jax.jit(jax.value_and_grad(loss, has_aux=True))(params, bt, noise))
    ((lp, op), gp), ((lg, og), gg) = results["per_chip"], results["global"]
    real = np.asarray(batch.doc)[:, batch.und_len :] > 0
    assert float(op["mse_mask"].sum()) > 0 and real.any(1).tolist() == [True, False, True, True]
    np.testing.assert_allclose(lp, lg, rtol=1e-5)
    np.testing.assert_allclose(op["ce"], og["ce"], atol=1e-5, rtol=1e-5)
    for key in ("velocity_target", "velocity_pred"):
        np.testing.assert_allclose(op[key][real], og[key][real], atol=1e-5, rtol=1e-5, err_msg=key)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(gp), jax.tree.leaves(gg), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_bad_scan_mode_names_the_key():
    config = lib.tiny_config()
    config.model.vae.encode_scan_mode = "per_row"
    with pytest.raises(ConfigError, match=r"^model.vae.encode_scan_mode: ") as err:
        validate(config)
    assert "\n" not in str(err.value)
