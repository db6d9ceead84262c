"""FLUX VAE: parity with diffusers' AutoencoderKL and with BFL's module tree (written below in torch from
the reference formulas, so its state-dict names are the ae.safetensors names), padded-batch masking,
latent helpers, converter strictness."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from bagel_jax.config import base_config
from bagel_jax.convert.hf_vision import diffusers_vae_to_params, flux_ae_keys, flux_ae_to_params, params_to_flux_ae
from bagel_jax.model.vae import (
    FluxVAE,
    denormalize_latent,
    masked_spatial_attention,
    normalize_latent,
    patchify_latent,
    sample_posterior,
    unpatchify_latent,
)


def vae_cfg(**kw):
    c = base_config().model.vae
    c.update(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, dtype="float32")
    c.update(**kw)
    return c


def rel_err(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().permute(0, 2, 3, 1).numpy()


def perturb(model: torch.nn.Module, scale=0.05):
    with torch.no_grad():  # non-trivial GroupNorm affine params and biases
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model.eval()


@functools.cache
def _jitted(cfg_items, method):
    cfg = vae_cfg(**dict(cfg_items))
    return jax.jit(lambda p, x, hw: FluxVAE(cfg).apply({"params": p}, x, hw, method=method))


def run(cfg, method, params, x, hw=None):
    items = tuple((k, v) for k, v in cfg.items() if k in ("ch", "ch_mult", "num_res_blocks", "dtype"))
    return _jitted(items, method)(params, jnp.asarray(x), None if hw is None else jnp.asarray(hw, jnp.int32))


# --- diffusers parity ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def diffusers_model():
    torch.manual_seed(0)
    model = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 64, 64, 64),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    return perturb(model)


@pytest.fixture(scope="module")
def params(diffusers_model):
    return diffusers_vae_to_params(diffusers_model.state_dict(), vae_cfg())


@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
def test_encode_decode_match_diffusers(diffusers_model, params, size):
    cfg = vae_cfg()
    h, w = size
    torch.manual_seed(h)
    x = torch.rand(1, 3, h, w) * 2 - 1
    z = torch.randn(1, 16, h // 8, w // 8)
    with torch.no_grad():
        dist = diffusers_model.encode(x).latent_dist
        decoded = diffusers_model.decode(z).sample
    mean, logvar = run(cfg, FluxVAE.encode, params, nhwc(x))
    assert mean.shape == (1, h // 8, w // 8, 16)
    assert rel_err(mean, nhwc(dist.mean)) <= 1e-5
    assert rel_err(logvar, nhwc(dist.logvar)) <= 1e-5
    assert rel_err(run(cfg, FluxVAE.decode, params, nhwc(z)), nhwc(decoded)) <= 1e-5


def test_padded_batch_equals_per_image(params):
    cfg = vae_cfg()
    rng = np.random.default_rng(0)
    sizes = [(48, 80), (64, 32), (24, 16)]
    images = [rng.uniform(-1, 1, (h, w, 3)).astype(np.float32) for h, w in sizes]
    canvas = rng.uniform(-5, 5, (3, 64, 80, 3)).astype(np.float32)  # garbage outside the valid regions
    for n, im in enumerate(images):
        canvas[n, : im.shape[0], : im.shape[1]] = im
    mean, logvar = run(cfg, FluxVAE.encode, params, canvas, sizes)
    assert np.isfinite(mean).all() and np.isfinite(logvar).all()
    latents = []
    for n, im in enumerate(images):
        h, w = im.shape[0] // 8, im.shape[1] // 8
        m1, lv1 = run(cfg, FluxVAE.encode, params, im[None])
        assert rel_err(mean[n, :h, :w], m1[0]) <= 1e-5
        assert rel_err(logvar[n, :h, :w], lv1[0]) <= 1e-5
        latents.append(np.asarray(m1[0]))
    # decode masked the same way: latent valid sizes
    zcanvas = rng.normal(size=(3, 8, 10, 16)).astype(np.float32)
    for n, z in enumerate(latents):
        zcanvas[n, : z.shape[0], : z.shape[1]] = z
    decoded = run(cfg, FluxVAE.decode, params, zcanvas, [(h // 8, w // 8) for h, w in sizes])
    for n, (h, w) in enumerate(sizes):
        alone = run(cfg, FluxVAE.decode, params, latents[n][None])[0]
        assert rel_err(decoded[n, :h, :w], alone) <= 1e-5


def test_empty_slot_is_finite(params):
    mean, logvar = run(vae_cfg(), FluxVAE.encode, params, np.zeros((2, 16, 16, 3), np.float32), [(16, 8), (0, 0)])
    assert np.isfinite(mean).all() and np.isfinite(logvar).all()


def test_bad_inputs_raise(params):
    cfg = vae_cfg()
    vae = FluxVAE(cfg)
    with pytest.raises(ValueError, match="image 1 valid size \\(20, 16\\) is not a multiple of 8"):
        vae.apply({"params": params}, jnp.zeros((2, 32, 32, 3)), np.array([[16, 16], [20, 16]]), method=FluxVAE.encode)
    with pytest.raises(ValueError, match="image 0 valid size \\(40, 16\\) exceeds the canvas"):
        vae.apply({"params": params}, jnp.zeros((1, 32, 32, 3)), np.array([[40, 16]]), method=FluxVAE.encode)
    with pytest.raises(ValueError, match="images must be \\[N, H, W, 3\\]"):
        vae.apply({"params": params}, jnp.zeros((1, 3, 32, 32)), method=FluxVAE.encode)


def test_chunked_spatial_attention_matches_formula():
    rng = np.random.default_rng(5)
    q, k, v = (rng.normal(size=(2, 23, 8)) for _ in range(3))
    valid = np.ones((2, 23), bool)
    valid[1, 9:] = False
    logits = np.einsum("nqc,nkc->nqk", q, k) / np.sqrt(8)
    logits = np.where(valid[:, None, :], logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    expected = np.einsum("nqk,nkc->nqc", p / p.sum(-1, keepdims=True), v)
    args = [jnp.asarray(a, jnp.float32) for a in (q, k, v)]
    for block in (1024, 5):  # one pass, and query blocks with a ragged tail
        got = masked_spatial_attention(*args, jnp.asarray(valid), block=block)
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


def test_bf16_encode_close_to_fp32(params):
    x = np.random.default_rng(3).uniform(-1, 1, (1, 32, 48, 3)).astype(np.float32)
    m32, _ = run(vae_cfg(), FluxVAE.encode, params, x)
    m16, _ = run(vae_cfg(dtype="bfloat16"), FluxVAE.encode, params, x)
    assert m16.dtype == jnp.float32 and np.isfinite(m16).all()
    assert rel_err(m16, m32) < 5e-2


# --- BFL layout: the reference's module tree, written here in torch from modeling/autoencoder.py ---


def _gn(c):
    return torch.nn.GroupNorm(32, c, eps=1e-6, affine=True)


class TResnet(torch.nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = _gn(cin), torch.nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _gn(cout), torch.nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = torch.nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class TAttn(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm = _gn(c)
        self.q, self.k, self.v, self.proj_out = (torch.nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (m(n).reshape(b, 1, c, h * w).transpose(2, 3) for m in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(a)


class TDown(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = torch.nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class TUp(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = torch.nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(c):
    mid = torch.nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = TResnet(c, c), TAttn(c), TResnet(c, c)
    return mid


class TEncoder(torch.nn.Module):
    def __init__(self, ch, mult, nrb, z):
        super().__init__()
        self.conv_in = torch.nn.Conv2d(3, ch, 3, padding=1)
        self.down = torch.nn.ModuleList()
        cin = ch
        for i, m in enumerate(mult):
            level = torch.nn.Module()
            level.block = torch.nn.ModuleList()
            for _ in range(nrb):
                level.block.append(TResnet(cin, ch * m))
                cin = ch * m
            if i != len(mult) - 1:
                level.downsample = TDown(cin)
            self.down.append(level)
        self.mid = _mid(cin)
        self.norm_out, self.conv_out = _gn(cin), torch.nn.Conv2d(cin, 2 * z, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class TDecoder(torch.nn.Module):
    def __init__(self, ch, mult, nrb, z):
        super().__init__()
        cin = ch * mult[-1]
        self.conv_in = torch.nn.Conv2d(z, cin, 3, padding=1)
        self.mid = _mid(cin)
        self.up = torch.nn.ModuleList()
        for i in reversed(range(len(mult))):  # built from the lowest resolution, each prepended
            level = torch.nn.Module()
            level.block = torch.nn.ModuleList()
            for _ in range(nrb + 1):
                level.block.append(TResnet(cin, ch * mult[i]))
                cin = ch * mult[i]
            if i != 0:
                level.upsample = TUp(cin)
            self.up.insert(0, level)
        self.norm_out, self.conv_out = _gn(cin), torch.nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for i in reversed(range(len(self.up))):
            for block in self.up[i].block:
                h = block(h)
            if i != 0:
                h = self.up[i].upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class TAutoEncoder(torch.nn.Module):
    def __init__(self, ch, mult, nrb, z=16):
        super().__init__()
        self.encoder, self.decoder = TEncoder(ch, mult, nrb, z), TDecoder(ch, mult, nrb, z)


def test_flux_layout_key_count_and_param_count_full_size():
    cfg = base_config().model.vae  # the release: ch 128, ch_mult (1, 2, 4, 4), 2 res blocks, z 16
    with torch.device("meta"):
        ref = TAutoEncoder(cfg.ch, tuple(cfg.ch_mult), cfg.num_res_blocks, cfg.z_channels)
    ref_sd = ref.state_dict()
    keys = flux_ae_keys(cfg)
    assert len(keys) == len(set(keys)) == 244 == len(ref_sd)
    assert set(keys) == set(ref_sd)
    shapes = jax.eval_shape(lambda: FluxVAE(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3))))
    ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(shapes)))
    assert ours == sum(t.numel() for t in ref_sd.values()) == 83_819_683


@pytest.fixture(scope="module")
def bfl_model():
    torch.manual_seed(1)
    return perturb(TAutoEncoder(32, (1, 2, 2), 2))


def test_flux_layout_parity_and_roundtrip(bfl_model):
    cfg = vae_cfg(ch_mult=(1, 2, 2), num_res_blocks=2)
    sd = bfl_model.state_dict()
    params = flux_ae_to_params(sd, cfg)
    torch.manual_seed(2)
    x = torch.rand(1, 3, 24, 40) * 2 - 1
    z = torch.randn(1, 16, 6, 10)
    with torch.no_grad():
        moments = nhwc(bfl_model.encoder(x))
        decoded = nhwc(bfl_model.decoder(z))
    mean, logvar = run(cfg, FluxVAE.encode, params, nhwc(x))
    assert rel_err(mean, moments[..., :16]) <= 1e-5 and rel_err(logvar, moments[..., 16:]) <= 1e-5
    assert rel_err(run(cfg, FluxVAE.decode, params, nhwc(z)), decoded) <= 1e-5
    back = params_to_flux_ae(params, cfg)
    assert list(back) == flux_ae_keys(cfg) and set(back) == set(sd)
    for key, value in sd.items():
        np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)


def test_flux_layout_errors_name_the_key(bfl_model):
    cfg = vae_cfg(ch_mult=(1, 2, 2), num_res_blocks=2)
    sd = dict(bfl_model.state_dict())
    with pytest.raises(KeyError, match="missing key 'decoder.up.2.upsample.conv.bias'"):
        flux_ae_to_params({k: v for k, v in sd.items() if k != "decoder.up.2.upsample.conv.bias"}, cfg)
    with pytest.raises(KeyError, match="unexpected key 'encoder.quant_conv.weight'"):
        flux_ae_to_params({**sd, "encoder.quant_conv.weight": torch.zeros(1)}, cfg)
    with pytest.raises(
        ValueError,
        match=r"'encoder.mid.attn_1.q.weight' has shape \(64, 64\), "
        r"expected \(64, 64, 1, 1\)",
    ):
        flux_ae_to_params({**sd, "encoder.mid.attn_1.q.weight": torch.zeros(64, 64)}, cfg)
    params = flux_ae_to_params(sd, cfg)
    del params["decoder"]["norm_out"]
    with pytest.raises(KeyError, match="missing param 'decoder/norm_out/scale'"):
        params_to_flux_ae(params, cfg)


# --- latent helpers ------------------------------------------------------------------------------


def test_patchify_matches_reference_formula_and_inverts():
    rng = np.random.default_rng(4)
    n, h, w, c, p = 2, 6, 4, 16, 2
    z = rng.normal(size=(n, h, w, c)).astype(np.float32)
    tokens = np.asarray(patchify_latent(jnp.asarray(z), p))
    assert tokens.shape == (n, (h // p) * (w // p), p * p * c)
    expected = np.zeros_like(tokens)
    for b in range(n):
        for r in range(h // p):
            for col in range(w // p):
                for pi in range(p):
                    for qi in range(p):
                        for ch in range(c):
                            expected[b, r * (w // p) + col, (pi * p + qi) * c + ch] = z[b, r * p + pi, col * p + qi, ch]
    np.testing.assert_array_equal(tokens, expected)
    # the reference's torch form (NCHW per image): reshape(C,h,p,w,p), einsum chpwq->hwpqc, reshape(-1, p*p*C)
    ref = torch.einsum("chpwq->hwpqc", torch.from_numpy(z[0]).permute(2, 0, 1).reshape(c, h // p, p, w // p, p))
    np.testing.assert_array_equal(tokens[0], ref.reshape(-1, p * p * c).numpy())
    np.testing.assert_array_equal(np.asarray(unpatchify_latent(jnp.asarray(tokens), h // p, w // p, p)), z)
    with pytest.raises(ValueError, match="multiples of 2"):
        patchify_latent(jnp.zeros((1, 3, 4, 16)))


def test_latent_normalisation_and_posterior_sample():
    cfg = vae_cfg()
    z = jnp.linspace(-2, 2, 12).reshape(1, 2, 2, 3)
    np.testing.assert_allclose(np.asarray(normalize_latent(z, cfg)), 0.3611 * (np.asarray(z) - 0.1159), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(denormalize_latent(normalize_latent(z, cfg), cfg)), np.asarray(z), atol=1e-6)
    mean, logvar = jnp.ones((2, 3, 3, 4)), jnp.full((2, 3, 3, 4), -1.0)
    rng = jax.random.PRNGKey(7)
    eps = np.asarray(jax.random.normal(rng, mean.shape))
    np.testing.assert_allclose(
        np.asarray(sample_posterior(mean, logvar, rng)), 1.0 + np.exp(-0.5) * eps, rtol=1e-6, atol=1e-6
    )
