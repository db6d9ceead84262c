"""SigLIP NaViT: parity with transformers' SiglipVisionModel (tiny, random, fp32), packed = separate calls,
and the converter's strictness."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import SiglipVisionConfig, SiglipVisionModel

from bagel_jax.config import base_config
from bagel_jax.convert.hf_vision import siglip_to_params
from bagel_jax.model.siglip import SiglipNaViT

PATCH, SIDE, HF_LAYERS = 14, 4, 3  # image 56 = 4 patches per side; we run HF_LAYERS - 1 layers


def model_cfg():
    m = base_config().model
    m.update(dtype="float32", attention_impl="reference", vit_max_num_patch_per_side=SIDE)
    m.vit.update(
        hidden_size=32,
        intermediate_size=64,
        num_layers=HF_LAYERS - 1,
        num_heads=2,
        patch_size=PATCH,
        num_positions=SIDE * SIDE,
    )
    return m


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    config = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=HF_LAYERS,
        num_attention_heads=2,
        image_size=PATCH * SIDE,
        patch_size=PATCH,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        attn_implementation="eager",
    )
    model = SiglipVisionModel(config).eval()
    with torch.no_grad():  # non-trivial norms and biases
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def setup(hf_model):
    cfg = model_cfg()
    params = siglip_to_params(hf_model.state_dict(), cfg)
    module = SiglipNaViT(cfg)
    apply = jax.jit(lambda p, x, pos, img: module.apply({"params": p}, x, pos, img))
    return cfg, params, apply


def patchify(image: np.ndarray, p: int = PATCH):
    """[H, W, 3] → ([n, p·p·3] in (ph, pw, c) order, pos ids row*SIDE + col)."""
    h, w = image.shape[0] // p, image.shape[1] // p
    patches = image.reshape(h, p, w, p, 3).transpose(0, 2, 1, 3, 4).reshape(h * w, p * p * 3)
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return patches, (rows * SIDE + cols).reshape(-1).astype(np.int32)


def hf_features(model, image: np.ndarray, layers: int) -> np.ndarray:
    """HF modules run on one image of any patch-multiple size: conv patch embed, learned positions at
    row*SIDE + col, the first ``layers`` encoder layers, post_layernorm."""
    x = torch.from_numpy(image).permute(2, 0, 1)[None]
    _h, _w = image.shape[0] // PATCH, image.shape[1] // PATCH
    _, pos = patchify(image)
    with torch.no_grad():
        emb = model.embeddings.patch_embedding(x).flatten(2).transpose(1, 2)
        hid = emb + model.embeddings.position_embedding(torch.from_numpy(pos).long())[None]
        for layer in model.encoder.layers[:layers]:
            hid = layer(hid, None)
        return model.post_layernorm(hid)[0].numpy()


def rel_err(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def test_native_image_matches_hf_hidden_states(hf_model, setup):
    cfg, params, apply = setup
    image = np.random.default_rng(0).uniform(-1, 1, (PATCH * SIDE, PATCH * SIDE, 3)).astype(np.float32)
    with torch.no_grad():
        out = hf_model(torch.from_numpy(image).permute(2, 0, 1)[None], output_hidden_states=True)
        expected = hf_model.post_layernorm(out.hidden_states[cfg.vit.num_layers])[0].numpy()
        last = out.last_hidden_state[0].numpy()
    patches, pos = patchify(image)
    ours = apply(params, patches[None], pos[None], np.ones((1, len(pos)), np.int32))[0]
    assert rel_err(ours, expected) <= 1e-5
    assert rel_err(ours, last) > 1e-2  # the last HF layer is really dropped


def test_non_square_image_matches_hf_layers(hf_model, setup):
    _, params, apply = setup
    image = np.random.default_rng(1).uniform(-1, 1, (2 * PATCH, 3 * PATCH, 3)).astype(np.float32)
    patches, pos = patchify(image)
    ours = apply(params, patches[None], pos[None], np.ones((1, len(pos)), np.int32))[0]
    assert rel_err(ours, hf_features(hf_model, image, HF_LAYERS - 1)) <= 1e-5


def test_packed_images_equal_separate_calls(setup):
    _, params, apply = setup
    rng = np.random.default_rng(2)
    sizes = [(2, 3), (4, 2), (3, 4)]  # in patches
    images = [rng.uniform(-1, 1, (h * PATCH, w * PATCH, 3)).astype(np.float32) for h, w in sizes]
    length = 40  # 6 + 8 + 12 = 26 real patches, the rest padding
    patches = rng.normal(size=(1, length, PATCH * PATCH * 3)).astype(np.float32)  # garbage in padding
    pos = np.zeros((1, length), np.int32)
    ids = np.zeros((1, length), np.int32)
    start, spans = 0, []
    for n, image in enumerate(images, start=1):
        p, q = patchify(image)
        patches[0, start : start + len(q)], pos[0, start : start + len(q)], ids[0, start : start + len(q)] = p, q, n
        spans.append((start, start + len(q)))
        start += len(q)
    packed = np.asarray(apply(params, patches, pos, ids))
    assert np.isfinite(packed).all()
    for image, (s, e) in zip(images, spans):
        p, q = patchify(image)
        alone = apply(params, p[None], q[None], np.ones((1, len(q)), np.int32))[0]
        np.testing.assert_allclose(packed[0, s:e], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("override", [dict(remat="full"), dict(remat="dots"), dict(dtype="bfloat16")])
def test_remat_and_bf16_variants(setup, override):
    cfg, params, apply = setup
    rng = np.random.default_rng(3)
    patches = rng.uniform(-1, 1, (1, 6, PATCH * PATCH * 3)).astype(np.float32)
    pos = np.array([[0, 1, 2, 4, 5, 6]], np.int32)
    ids = np.array([[1, 1, 1, 1, 2, 2]], np.int32)
    variant = model_cfg()
    variant.update(**override)
    got = jax.jit(lambda p: SiglipNaViT(variant).apply({"params": p}, patches, pos, ids))(params)
    tol = 1e-5 if "remat" in override else 5e-2
    assert got.dtype == jnp.dtype(variant.dtype)
    assert rel_err(np.asarray(got, np.float32), apply(params, patches, pos, ids)) <= tol


def test_bad_patch_shape_raises(setup):
    cfg, params, _ = setup
    with pytest.raises(ValueError, match="patches must be"):
        SiglipNaViT(cfg).apply(
            {"params": params}, jnp.zeros((1, 4, 10)), jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32)
        )


def test_converter_prefixes_linear_patch_form_and_truncation(hf_model):
    cfg = model_cfg()
    sd = hf_model.state_dict()
    base = siglip_to_params(sd, cfg)
    assert set(base) == {"patch_embedding", "position_embedding", "layers_0", "layers_1", "post_layernorm"}
    # the BAGEL checkpoint stores the Linear form [D, p·p·3] under vit_model.vision_model.
    w = sd["embeddings.patch_embedding.weight"]
    bagel = {"vit_model.vision_model." + k: v for k, v in sd.items() if not k.startswith("head.")}
    bagel["vit_model.vision_model.embeddings.patch_embedding.weight"] = w.permute(0, 2, 3, 1).reshape(32, -1)
    converted = siglip_to_params(bagel, cfg)
    np.testing.assert_array_equal(converted["patch_embedding"]["kernel"], base["patch_embedding"]["kernel"])
    hub = {"vision_model." + k: v for k, v in sd.items()}
    np.testing.assert_array_equal(
        siglip_to_params(hub, cfg)["layers_1"]["mlp"]["fc1"]["kernel"], base["layers_1"]["mlp"]["fc1"]["kernel"]
    )


def test_converter_errors_name_the_key(hf_model):
    cfg = model_cfg()
    sd = dict(hf_model.state_dict())
    missing = {k: v for k, v in sd.items() if k != "encoder.layers.1.mlp.fc2.bias"}
    with pytest.raises(KeyError, match="encoder.layers.1.mlp.fc2.bias"):
        siglip_to_params(missing, cfg)
    with pytest.raises(KeyError, match="unexpected key 'encoder.extra.weight'"):
        siglip_to_params({**sd, "encoder.extra.weight": torch.zeros(1)}, cfg)
    bad = {**sd, "encoder.layers.0.self_attn.q_proj.weight": torch.zeros(32, 16)}
    with pytest.raises(ValueError, match=r"q_proj.weight.*\(32, 16\).*\(32, 32\)"):
        siglip_to_params(bad, cfg)


def _eqns(jaxpr):
    """Every equation of a jaxpr and of the jaxprs nested in its equations' parameters."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                sub = sub if hasattr(sub, "eqns") else getattr(sub, "jaxpr", None)
                if hasattr(sub, "eqns"):
                    yield from _eqns(sub)


def test_siglip_attention_on_tpu_reaches_the_kernel_unpadded():
    """SigLIP so400m's attention (1152 wide, 16 heads × 72) reaches the Pallas kernel as [B, P, 16·72] tiles (head
    groups), no config needed; traced only (the kernel itself runs on a TPU; its numerics: test_split_splash.py)."""
    from bagel_jax.model.siglip import SiglipAttention, image_mask_meta

    x = jax.ShapeDtypeStruct((1, 128, 1152), jnp.bfloat16)
    meta = image_mask_meta(jnp.ones((1, 128), jnp.int32))
    attn = SiglipAttention(hidden=1152, num_heads=16, attention_impl="tpu", dtype=jnp.bfloat16)
    jaxpr = jax.make_jaxpr(lambda x: attn.init(jax.random.PRNGKey(0), x, meta))(x)
    calls = [e for e in _eqns(jaxpr.jaxpr) if e.primitive.name == "pallas_call"]
    assert [e.invars[2].aval.shape for e in calls] == [(1, 128, 16 * 72)]  # q of the forward kernel, not 16 · 128
