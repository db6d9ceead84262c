"""AOT planner: compile the train step for a small TPU topology on this CPU host (needs libtpu)."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.tpu  # needs libtpu (the [tpu] extra); conftest.py fails these tests without it

import train_toy as T  # noqa: E402
from bagel_jax import aot  # noqa: E402
from configs_util import shipped_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_config():
    return shipped_config("tiny")


@pytest.fixture(scope="module")
def v5e_devices():
    return aot.topology_devices("v5e:2x2")


def test_toy_train_step_compiles_for_v5e_with_expected_flops(v5e_devices):
    config = T.toy_config(data=2, fsdp=2)
    p = aot.plan(config, v5e_devices, "train_toy:aot_spec")
    assert p["device_kind"] == "TPU v5 lite" and p["num_devices"] == 4
    assert p["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1, "sequence": 1}
    assert p["argument_bytes"] > 0 and p["output_bytes"] > 0 and p["hbm_bytes"] == 16 * 2**30
    # matmul MACs per step (by hand): tokens 8·16 = 128 through vit 12·32, connector 32·32, k/v 2·32·32,
    # lm_head 32·64; each expert (64 tokens) q/o 2·32·32 + SwiGLU 3·32·64; attention per expert
    # 2 (QK, AV) · B·H·8 queries·16 keys·hd 8. fwd + bwd = 3 × fwd, 2 FLOPs per MAC.
    macs = (
        128 * (12 * 32 + 32 * 32 + 2 * 32 * 32 + 32 * 64)
        + 128 * (2 * 32 * 32 + 3 * 32 * 64)
        + 2 * 2 * 8 * 4 * 8 * 16 * 8
    )
    total = p["compiled_flops_per_device"] * p["num_devices"]
    assert 6 * macs <= total <= 1.5 * 6 * macs, (total, 6 * macs)
    text = aot.report(p, step_time=0.01)
    assert "FITS" in text and "MFU @ 0.01 s/step" in text


def test_mot_language_model_compiles_for_v5e(v5e_devices):
    config = _tiny_config()
    config.parallel.update(data=2, fsdp=2)
    config.data.update(batch_size=4, seq_len=256, und_len=192, gen_len=64)
    config.model.update(attention_impl="reference", num_layers=1)
    p = aot.plan(config, v5e_devices, "mot_lm")
    # by hand: embed + lm_head 2·512·64; per expert q 64·64+64, k/v 2·(64·32+32), o 64·64, QK-norms 2·16,
    # SwiGLU 3·64·128, two layer norms 2·64; two experts; final norm per expert 2·64
    expert = 64 * 64 + 64 + 2 * (64 * 32 + 32) + 64 * 64 + 2 * 16 + 3 * 64 * 128 + 2 * 64
    assert p["params"] == 2 * 512 * 64 + 2 * expert + 2 * 64 and p["argument_bytes"] > 0
    # BAGEL's formula (both experts' tokens, dense len², embedding counted as a matmul) vs what XLA compiled
    ratio = p["compiled_flops_per_device"] * p["num_devices"] / p["formula_flops"]
    assert 0.6 < ratio < 1.4, ratio


def test_flops_count_each_loop_trip_count_times_and_match_the_formula(v5e_devices):
    """XLA's cost analysis visits a while body once; ``loop_scaled_flops`` multiplies it by the trip count, for the
    compiled (per chip) and the lowered (global) HLO. The planner's model FLOPs (scanned decoder, remat full, Pallas
    attention: lowered without remat) are within 1.05× of BAGEL's formula without its attention and embedding terms."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    from bagel_jax.train import metrics
    from bagel_jax.train.hlo_flops import loop_scaled_flops

    layers, width, rows = 6, 256, 128

    def stack(ws, x, scan):
        layer = lambda h, w: jnp.tanh(h @ w)  # noqa: E731
        if scan:
            h = jax.lax.scan(lambda h, w: (layer(h, w), None), x, ws)[0]
        else:
            h = x
            for i in range(layers):
                h = layer(h, ws[i])
        h = jax.lax.fori_loop(2, 5, lambda i, h: h * 1.5, h)  # a loop from 2: 3 trips of rows × width FLOPs
        return jnp.sum(h)

    sh = SingleDeviceSharding(v5e_devices[0])
    shapes = (
        jax.ShapeDtypeStruct((layers, width, width), jnp.float32),
        jax.ShapeDtypeStruct((rows, width), jnp.float32),
    )
    got = {}
    for scan in (False, True):
        lowered = jax.jit(jax.grad(lambda w, x: stack(w, x, scan), (0, 1)), in_shardings=(sh, sh)).lower(*shapes)
        got[scan] = (loop_scaled_flops(lowered.as_text(dialect="hlo")), loop_scaled_flops(lowered.compile().as_text()))
    matmuls = 6 * rows * width * width * layers  # fwd + bwd (weights and input)
    for lowered, compiled in got.values():
        assert matmuls <= lowered.flops <= 1.02 * matmuls and matmuls <= compiled.flops <= 1.02 * matmuls
    assert got[True][0].flops == pytest.approx(got[False][0].flops, rel=0.01)  # elementwise bookkeeping differs
    assert got[True][1].flops == pytest.approx(got[False][1].flops, rel=0.01)
    assert got[True][1].raw < 0.3 * got[True][1].flops  # XLA alone: the scanned layer once
    assert 3 in dict(got[False][0].loops).values() and not got[True][0].unknown

    # the whole BAGEL step: the formula's matmuls (LM head on the label slots) + the towers it leaves out
    config = _tiny_config()
    config.parallel.update(data=2, fsdp=2)
    config.data.batch_size = 4
    config.model.update(attention_impl="tpu", remat="full", scan_layers=True, hidden_size=256, intermediate_size=1024)
    config.model.vae.encode = "masked"  # every image slot at full size, as the step runs on TPU
    spec = aot.get_builder("bagel")(config)
    model = aot.model_flops(config, v5e_devices, "bagel")
    rows, length = config.data.batch_size, config.data.seq_len
    terms = metrics.train_flop_terms(config.model, rows * length, rows * length**2, head_tokens=spec.lm_head_tokens)
    towers = metrics.tower_flop_terms(config.model, **spec.towers, freeze=tuple(config.train.freeze))
    assert model / terms["matmuls"] > 1.2  # at this size the VAE encoder is a large share of the step
    assert 1.0 <= model / (terms["matmuls"] + towers["vit"] + towers["vae_encode"]) <= 1.05


def test_out_of_memory_is_reported_not_raised(v5e_devices):
    config = T.toy_config(data=2, fsdp=2)
    config.data.batch_size = 4

    def huge(cfg):  # an 8 GiB parameter: 4 GiB per chip (fsdp=2), ×4 with Adam moments and EMA > 16 GiB
        import flax.linen as nn
        import jax
        import jax.numpy as jnp

        def init_fn(rng):
            return {
                "language_model": {
                    "w": nn.with_logical_partitioning(nn.initializers.zeros, ("embed", "mlp"))(rng, (2**16, 2**15))
                }
            }

        def loss_fn(params, batch, rng):
            y = batch["x"] @ params["language_model"]["w"]
            return jnp.mean(y**2), {}

        return aot.ModelSpec(init_fn, loss_fn, {"x": jax.ShapeDtypeStruct((4, 2**16), jnp.float32)})

    aot.register_loss("huge")(huge)
    p = aot.plan(config, v5e_devices, "huge")
    assert "RESOURCE_EXHAUSTED" in p["oom"]
    assert "DOES NOT FIT" in aot.report(p)
    # XLA's list of the largest allocations, when its message has one, follows in the report
    detail = {**p, "oom_detail": ["Largest program allocations in hbm:", "1. Size: 2.00G"]}
    tail = "largest buffers (XLA):\n  Largest program allocations in hbm:\n  1. Size: 2.00G"
    assert aot.report(detail).endswith(tail)


def test_planner_cli():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "tests"), ROOT]))
    env.pop("XLA_FLAGS", None)
    cmd = [
        sys.executable,
        "-m",
        "bagel_jax.aot",
        "--config=configs/tiny.py",
        "--topology=v5e:2x2",
        "--loss=train_toy:aot_spec",
        "--config.parallel.data=2",
        "--config.parallel.fsdp=2",
        "--config.data.batch_size=8",
        "--step_time=0.5",
    ]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "per-chip HBM" in out.stdout and "4 × TPU v5 lite" in out.stdout and "MFU @ 0.5 s/step" in out.stdout
    bad = subprocess.run(
        cmd[:-4] + ["--config.parallel.data=3"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: parallel:") and bad.stderr.count("\n") == 1, bad.stderr


def test_multislice_mesh_spans_slices_along_dcn_axis():
    from bagel_jax.parallel.mesh import make_mesh

    devices = aot.topology_devices("v5e:2x2", num_slices=2)
    config = T.toy_config(data=2, fsdp=4, dcn_data=2)
    mesh = make_mesh(config, devices)
    slices = [[d.slice_index for d in row.flat] for row in mesh.devices]
    assert slices == [[0, 0, 0, 0], [1, 1, 1, 1]]  # data (DCN) across slices, fsdp within a slice


@pytest.mark.slow
def test_full_bagel_compiles_for_v5e_with_vae_frozen(v5e_devices):
    import jax

    from bagel_jax.model.bagel import make_init_fn

    config = _tiny_config()
    config.parallel.update(data=2, fsdp=2)
    config.data.batch_size = 4
    p = aot.plan(config, v5e_devices, "bagel")
    shapes = jax.eval_shape(make_init_fn(config)[1], jax.random.PRNGKey(0))
    vae = sum(x.size for x in jax.tree.leaves(shapes["vae"]))
    tables = sum(x.size for k in ("latent_pos_embed", "vit_pos_embed") for x in jax.tree.leaves(shapes[k]))
    assert p["loss"] == "bagel" and p["argument_bytes"] > 0 and vae > 0 and tables > 0
    # the VAE and the fixed sin-cos tables are always frozen, everything else trains
    assert p["trainable_params"] == p["params"] - vae - tables


@pytest.mark.slow
@pytest.mark.parametrize("encode_scan", [False, True])
def test_tensor_pair_encodes_each_image_once(v5e_devices, encode_scan):
    """With a tensor axis the two chips of a pair hold the same rows; the frozen VAE encoder must still run each
    image once, split over the pair (before: both chips encoded the pair's images, +1× the encoder's FLOPs). With
    ``encode_scan`` one slot of 2 rows does not split over fsdp 2 × tensor 2, so each step encodes 2 slots."""
    from bagel_jax.train import metrics

    hw = {}
    for tensor, devices in ((2, v5e_devices), (1, v5e_devices[:2])):
        config = _tiny_config()
        config.parallel.update(data=1, fsdp=2, tensor=tensor)
        config.data.batch_size = 2
        config.model.vae.update(encode="masked", encode_scan=encode_scan)
        p = aot.plan(config, devices, "bagel")
        assert "oom" not in p, p.get("oom")
        hw[tensor] = p["hardware_flops"]
    spec = aot.get_builder("bagel")(config)
    encoder = metrics.tower_flop_terms(config.model, **spec.towers, freeze=tuple(config.train.freeze))["vae_encode"]
    assert encoder > 0.2 * hw[1]  # the encoder is a large share of this step, so a repeat would show
    assert hw[2] - hw[1] < 0.25 * encoder, (hw, encoder)


@pytest.mark.slow
def test_vae_encode_scan_cuts_encoder_memory(v5e_devices):
    """``model.vae.encode_scan`` encodes a row's image slots one after another: with 4 images of 256² per row and
    one row per chip, the step's temporaries drop (the 7B plan: 28.3 → 3.4 GiB for 12 × 1024² per row; here
    ~200 → ~44 MiB)."""
    temps = {}
    for scan in (False, True):
        config = _tiny_config()
        config.parallel.update(data=1, fsdp=4)
        config.model.update(max_latent_size=16)
        config.model.vae.update(ch=32, ch_mult=(1, 2, 4, 4), num_res_blocks=1, encode_scan=scan)
        config.data.update(
            batch_size=4,
            seq_len=1184,
            und_len=160,
            gen_len=1024,
            max_vae_images=4,
            vae_image_size=(256, 256),
            vae_transform=(256, 128, 16),
        )
        p = aot.plan(config, v5e_devices, "bagel")
        assert "oom" not in p, p.get("oom")
        temps[scan] = p["temp_bytes"]
    assert temps[True] < 0.6 * temps[False], temps


def test_cached_inference_step_compiles_for_v5e(v5e_devices):
    """``--infer``: prefill 2 requests × 3 CFG rows of 128 tokens, then one Euler step of a 64² image, tiny model with
    its params fsdp-sharded over 4 chips: it fits, per-chip memory is reported; bad CFG rows are one InputError."""
    config = _tiny_config()
    config.model.attention_impl = "reference"
    config.parallel.update(data=1, fsdp=-1)
    small = aot.plan_inference(config, v5e_devices, context_tokens=128, image_size=64, requests=2)
    assert small["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1, "sequence": 1} and "oom" not in small
    assert small["argument_bytes"] > 0 and small["temp_bytes"] > 0 and small["peak_bytes"] < small["hbm_bytes"]
    assert small["image_size"] == 64 and small["params"] > 0
    text = aot.report_inference(small)
    assert "per-chip HBM" in text and "FITS" in text
    with pytest.raises(aot.InputError, match="--cfg_rows"):
        aot.plan_inference(config, v5e_devices, context_tokens=128, image_size=64, requests=2, cfg_rows=4)


def test_per_chip_encode_compiles_for_v5e_at_the_global_scans_cost(v5e_devices):
    """``encode_scan_mode="per_chip"`` compiles for a v5e 2×2 (fsdp 2 × tensor 2, 2 rows of 4 slots of 32², a
    two-level VAE: one image per chip per step) at no more than the global slot scan's FLOPs and memory. XLA's cost
    analysis counts a conditional as its costliest branch (the toy switch below: the 2-matmul branch, not the sum,
    not the skip) and a loop body once (``loop_scaled_flops`` scales it), so every chunk counts at the full canvas:
    a skipped chunk saves at run time only, which no compile-time count shows. (The global scan's compiled program
    counts 1.23× the per-chip one here.)"""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, SingleDeviceSharding
    from jax.sharding import PartitionSpec as P

    from bagel_jax.model.bagel import Bagel
    from bagel_jax.model.vae import FluxVAE
    from bagel_jax.parallel.mesh import logical_rules, make_mesh, use_mesh
    from bagel_jax.train.hlo_flops import loop_scaled_flops

    n, sh = 128, SingleDeviceSharding(v5e_devices[0])
    branches = (lambda a: a * 0, lambda a: a @ a, lambda a: (a @ a) @ a)
    toy = jax.jit(lambda i, a: jax.lax.switch(i, branches, a)).lower(
        jax.ShapeDtypeStruct((), jnp.int32, sharding=sh), jax.ShapeDtypeStruct((n, n), jnp.float32, sharding=sh)
    )
    assert loop_scaled_flops(toy.compile().as_text()).flops == pytest.approx(2 * 2 * n**3, rel=0.01)

    got = {}
    for mode in ("global", "per_chip"):
        config = _tiny_config()
        config.parallel.update(data=1, fsdp=2, tensor=2)
        config.data.batch_size = 2
        config.model.vae.update(ch_mult=(1, 2), encode="masked", encode_scan=True, encode_scan_mode=mode)
        mesh, model = make_mesh(config, v5e_devices), Bagel(config.model)
        vae = jax.eval_shape(lambda: FluxVAE(config.model.vae).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
        params = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P())), vae["params"]
        )
        rows = NamedSharding(mesh, P(("data", "fsdp")))
        images = jax.ShapeDtypeStruct((2, 4, 32, 32, 3), jnp.uint8, sharding=rows)
        hw = jax.ShapeDtypeStruct((2, 4, 2), jnp.int32, sharding=rows)
        run = lambda p, x, h: model.apply({"params": {"vae": p}}, x, h, method=Bagel.encode_moments)  # noqa: E731
        with use_mesh(mesh, logical_rules(config)):
            compiled = jax.jit(run).lower(params, images, hw).compile()
        text = compiled.as_text()
        got[mode] = (loop_scaled_flops(text).flops, compiled.memory_analysis().temp_size_in_bytes, text)
    (flops_g, temp_g, _), (flops_c, temp_c, text_c) = got["global"], got["per_chip"]
    one = jax.jit(lambda p, x, h: FluxVAE(config.model.vae).apply({"params": p}, x, h, method=FluxVAE.encode))
    sds = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)  # noqa: E731
    one = loop_scaled_flops(
        one.lower(jax.tree.map(sds, vae["params"]), sds(jnp.zeros((1, 32, 32, 3))), sds(jnp.zeros((1, 2), jnp.int32)))
        .compile()
        .as_text()
    ).flops
    assert "conditional(" in text_c
    # each chip: its 2 chunks of 1 image, each counted as the full-canvas encode (the costliest branch)
    assert flops_c == pytest.approx(2 * one, rel=0.02), (flops_c, one)
    assert flops_c <= 1.02 * flops_g, (flops_c, flops_g)
    # temporaries: one image's activations per chip either way; the per-chip path's sort and scatter add a small
    # fixed amount on TPU (+0.65 MiB here at VAE width 32 and 64 alike; 0.15 MiB less than the global scan with 8 slots)
    assert temp_c <= temp_g + 2**20, (temp_c, temp_g)
