"""How packed VAE slots are encoded (model/vae_batch.py): ``by_size`` = the masked oracle on random layouts of mixed
sizes; ``reference_padding`` = the official trainer's zero-padded batch encode (diffusers' AutoencoderKL, the same
network) and differs from encoding each image alone exactly where a row mixes sizes; the config switches in Bagel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

import bagel_testlib as lib
from bagel_jax.batch import KIND_CLEAN_VAE, KIND_NOISED_VAE
from bagel_jax.config import ConfigError, base_config, validate
from bagel_jax.convert.hf_vision import diffusers_vae_to_params
from bagel_jax.model.bagel import Bagel
from bagel_jax.model.vae import FluxVAE
from bagel_jax.model.vae_batch import bucket_sides, encode_by_size, reference_hw, reference_padded


def vae_cfg(ch_mult=(1, 2, 2, 2)):
    c = base_config().model.vae
    c.update(ch=32, ch_mult=ch_mult, num_res_blocks=1, dtype="float32")
    return c


def rel_err(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def test_bucket_sides():
    assert bucket_sides(48, 1, 8) == (48,)
    assert bucket_sides(48, 2, 8) == (24, 48)
    assert bucket_sides(40, 2, 16) == (32, 40)  # rounded up to the multiple, capped at the side
    assert bucket_sides(1024, 4, 16) == (256, 512, 768, 1024)


def test_by_size_equals_masked_on_random_layouts():
    """Random layouts (empty, full-canvas, smaller-than-bucket and mixed sizes; 2 × 2 buckets, chunks of 3): every
    image's valid latent region equals the masked canvas encode (f32 noise), the rest is finite."""
    cfg = vae_cfg(ch_mult=(1,))  # f = 1: one level and the mid block (attention), quick to compile
    vae, f, (hh, ww), m = FluxVAE(cfg), 1, (4, 6), 7
    params = vae.init(jax.random.key(0), jnp.zeros((1, hh, ww, 3)))["params"]
    encode = lambda p, x, hw: vae.apply({"params": p}, x, hw, method=FluxVAE.encode)  # noqa: E731
    masked = jax.jit(encode)
    by_size = jax.jit(
        lambda p, x, hw: encode_by_size(
            lambda xx, xhw: encode(p, xx, xhw), x, hw, downsample=f, z_channels=16, levels=2, chunk=3
        )
    )
    rng = np.random.default_rng(0)
    layouts = [np.zeros((m, 2), int), np.tile([hh, ww], (m, 1)), np.tile([hh // 2, ww // 2], (m, 1))]
    for _ in range(5):
        # at least 2 × 2 pixels: GroupNorm over 1 pixel amplifies f32 rounding by 1/sqrt(eps)
        hw = np.stack([rng.integers(2, hh // f + 1, m), rng.integers(2, ww // f + 1, m)], -1) * f
        hw[rng.random(m) < 0.3] = 0  # empty slots
        hw[rng.random(m) < 0.2] = (hh, ww)
        layouts.append(hw)
    for hw in layouts:
        x = rng.uniform(-1, 1, (m, hh, ww, 3)).astype(np.float32)
        want, got = masked(params, x, hw), by_size(params, x, hw)
        for w, g in zip(want, got, strict=True):
            assert g.shape == w.shape and np.isfinite(np.asarray(g)).all()
            for n, (h, wd) in enumerate(hw):
                if h:
                    assert rel_err(g[n, : h // f, : wd // f], w[n, : h // f, : wd // f]) <= 1e-5, (hw, n)


@pytest.fixture(scope="module")
def diffusers_vae():
    torch.manual_seed(0)
    model = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    with torch.no_grad():  # non-trivial GroupNorm affine params and biases
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_reference_padding_equals_official_padded_encode(diffusers_vae):
    """Row 0 mixes sizes: its images encoded zero-padded to the row's largest (h, w) = (8, 8) (a size no image has)
    match diffusers on that padded batch (the official ``padded_images``), and differ from each image alone; row 1
    is one size: the same as alone."""
    cfg, f = vae_cfg(ch_mult=(1, 2)), 2
    params = diffusers_vae_to_params(diffusers_vae.state_dict(), cfg)
    sizes = np.array([[(4, 8), (8, 4), (2, 2)], [(4, 4), (4, 4), (0, 0)]])  # [B=2, N=3, 2]
    hh, ww = 8, 12
    canvas = np.random.default_rng(1).uniform(-1, 1, (2, 3, hh, ww, 3)).astype(np.float32)  # garbage beyond images
    vae = FluxVAE(cfg)
    encode = jax.jit(
        lambda x, hw: vae.apply({"params": params}, x.reshape(6, hh, ww, 3), hw.reshape(6, 2), method="encode")
    )
    images, enc_hw = reference_padded(jnp.asarray(canvas), jnp.asarray(sizes))
    assert enc_hw.tolist() == [[[8, 8]] * 3, [[4, 4], [4, 4], [0, 0]]]
    ref_mean, ref_logvar = (np.asarray(t).reshape(2, 3, hh // f, ww // f, 16) for t in encode(images, enc_hw))
    alone_mean = np.asarray(encode(canvas, sizes)[0]).reshape(ref_mean.shape)
    for r in range(2):
        real = [(n, h, w) for n, (h, w) in enumerate(sizes[r]) if h]
        padded = np.zeros((len(real), 3, max(h for _, h, _ in real), max(w for *_, w in real)), np.float32)
        for i, (n, h, w) in enumerate(real):
            padded[i, :, :h, :w] = canvas[r, n, :h, :w].transpose(2, 0, 1)
        with torch.no_grad():
            dist = diffusers_vae.encode(torch.from_numpy(padded)).latent_dist
        for i, (n, h, w) in enumerate(real):
            crop = (slice(None, h // f), slice(None, w // f))
            want_mean = dist.mean[i].permute(1, 2, 0).numpy()[crop]
            assert rel_err(ref_mean[r, n][crop], want_mean) <= 1e-5
            assert rel_err(ref_logvar[r, n][crop], dist.logvar[i].permute(1, 2, 0).numpy()[crop]) <= 1e-5
            diff = rel_err(alone_mean[r, n][crop], want_mean)
            assert (diff > 1e-3) if r == 0 else (diff <= 1e-5), (r, n, diff)


def test_reference_hw_per_row():
    hw = jnp.asarray([[[16, 48], [32, 16], [0, 0]], [[0, 0], [0, 0], [0, 0]]])
    assert reference_hw(hw).tolist() == [[[32, 48], [32, 48], [0, 0]], [[0, 0]] * 3]


@pytest.fixture(scope="module")
def packed():
    config, cfg, params, _ = lib.tiny_setup()
    docs = lib.documents(lib.four_samples(), lib.layout(cfg))
    batch = lib.packed_batch([docs], lib.budgets())
    return cfg, params, batch


def latents(cfg, params, batch, **vae):
    """Clean latent tokens of every real VAE token of the row (gathered at vae_src), posterior noise fixed."""
    cfg = cfg.copy_and_resolve_references()
    cfg.vae.update(**vae)
    b, n, hh, ww, _ = batch.vae_images.shape
    noise = jnp.asarray(np.random.default_rng(0).standard_normal((b, n, hh // 8, ww // 8, 16)), jnp.float32)
    x0 = jax.jit(lambda p, bt: Bagel(cfg).apply({"params": p}, bt, posterior_noise=noise, method=Bagel.encode_latents))(
        params, batch
    )
    kind = np.asarray(batch.kind[0, batch.und_len :])
    src = np.asarray(batch.vae_src[0])[(kind == KIND_CLEAN_VAE) | (kind == KIND_NOISED_VAE)]
    return np.asarray(x0[0]).reshape(-1, x0.shape[-1])[src]


def test_bagel_encode_switches(packed):
    """In Bagel: ``by_size`` = ``masked`` on every real latent token (test_bagel compares the default encode with
    each image alone too); ``reference_padding`` changes the tokens of a row that mixes sizes (the four-sample row:
    32×48, 32×32 and 48×32 images, none of the row's max 48×48), the same under ``by_size`` and the slot scan."""
    cfg, params, batch = packed
    masked = latents(cfg, params, batch, encode="masked")
    np.testing.assert_allclose(latents(cfg, params, batch, encode="by_size"), masked, rtol=1e-5, atol=1e-5)
    ref = latents(cfg, params, batch, encode="by_size", reference_padding=True)
    assert np.abs(ref - masked).max() > 1e-2
    ref_scan = latents(cfg, params, batch, encode="masked", encode_scan=True, reference_padding=True)
    np.testing.assert_allclose(ref_scan, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("encode", "fast", "model.vae.encode"),
        ("encode_levels", 0, "model.vae.encode_levels"),
        ("encode_chunk", 0, "model.vae.encode_chunk"),
    ],
)
def test_bad_encode_config_names_the_key(key, value, match):
    c = base_config()
    c.model.vae[key] = value
    with pytest.raises(ConfigError, match=match):
        validate(c)
