"""LanguageModel vs transformers Qwen2 / Qwen3 (tiny random fp32 models) through the HF converter.

Qwen3 with ``attention_bias=True`` and the o_proj bias removed is exactly BAGEL's attention
(Qwen2 + qkv bias + per-head RMS QK-norm before RoPE), so it checks our ``qk_norm=True`` path.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from bagel_jax.attention import MaskMeta, Split, metadata_from_splits
from bagel_jax.config import base_config
from bagel_jax.convert.hf import (
    ConversionError,
    model_config_from_hf,
    params_to_qwen2,
    qwen2_to_params,
    stack_layers,
    unstack_layers,
)
from bagel_jax.model.mot import LanguageModel

TOL = 1e-5
SHAPES = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)


def _randomise(model: torch.nn.Module, seed: int):
    """Every parameter random and O(1)-relevant: norms 1 ± 0.2, biases and weights N(0, 0.1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.1 * noise)


def _hf_model(kind: str):
    torch.manual_seed(0)
    if kind == "qwen2":
        conf = transformers.Qwen2Config(rope_theta=1_000_000.0, **SHAPES)
        model = transformers.Qwen2ForCausalLM(conf)
    else:
        conf = transformers.Qwen3Config(rope_theta=1_000_000.0, attention_bias=True, head_dim=16, **SHAPES)
        model = transformers.Qwen3ForCausalLM(conf)
        for layer in model.model.layers:  # BAGEL: q/k/v bias, no o_proj bias
            layer.self_attn.o_proj.bias = None
    model.config._attn_implementation = "eager"
    _randomise(model, seed=1 if kind == "qwen2" else 2)
    return model.eval().float()


@pytest.fixture(scope="module", params=["qwen2", "qwen3"])
def hf(request):
    return request.param, _hf_model(request.param)


def _cfg(hf_model, layer_module="dense", scan_layers=False):
    m = base_config().model
    m.update(dtype="float32", param_dtype="float32", attention_impl="reference")
    m = model_config_from_hf(hf_model.config, m)
    m.update(layer_module=layer_module, scan_layers=scan_layers)
    return m


def _hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids[None].astype(np.int64))).logits[0].numpy()


def _rel(ours, ref) -> float:
    return float(np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref)))


def _run(cfg, params, und_ids, gen_ids, position, meta):
    """Text ids in und slots and (optionally) gen slots → logits for both regions."""

    def fwd(m, und_ids, gen_ids):
        und_h, gen_h = m(m.embed(und_ids), m.embed(gen_ids), position, meta)
        return m.logits(und_h), m.logits(gen_h)

    return jax.jit(lambda p, a, b: LanguageModel(cfg).apply(p, a, b, method=fwd))(params, und_ids, gen_ids)


def _meta(splits, length):
    md = metadata_from_splits(splits, length)
    return MaskMeta(**{k: jnp.asarray(v)[None] for k, v in md.items()})


def test_model_config_from_hf_reads_rope_parameters(hf):
    kind, model = hf
    cfg = _cfg(model)
    assert cfg.rope_theta == 1_000_000.0 and cfg.qk_norm == (kind == "qwen3") and cfg.qkv_bias
    assert model.config.rope_parameters["rope_theta"] == 1_000_000.0


@pytest.mark.parametrize("layer_module", ["dense", "mot"])
def test_single_document_logits_match_hf(hf, layer_module):
    kind, model = hf
    cfg = _cfg(model, layer_module)
    params = qwen2_to_params(model.state_dict(), cfg)
    ids = np.random.default_rng(0).integers(0, 512, size=24).astype(np.int32)
    meta = _meta([Split(1, "causal", 24)], 24)
    und_logits, _ = _run(
        cfg, params, ids[None], np.zeros((1, 0), np.int32), jnp.arange(24, dtype=jnp.int32)[None], meta
    )
    assert _rel(und_logits[0], _hf_logits(model, ids)) <= TOL


@pytest.mark.parametrize("layout", ["dense", "mot", "mot_gen_slots", "mot_scan"])
def test_packed_documents_match_hf_run_alone(hf, layout):
    """3 documents + padding in one row; each document's logits equal HF on that document alone.

    ``mot_gen_slots``: MoT with the copied gen expert and the 3rd document placed in the gen slots
    (modality-sorted layout), so both experts and the slot routing are exercised.
    """
    kind, model = hf
    layer_module = "dense" if layout == "dense" else "mot"
    cfg = _cfg(model, layer_module, scan_layers=layout == "mot_scan")
    params = qwen2_to_params(model.state_dict(), cfg)
    rng = np.random.default_rng(1)
    lens, pad = [7, 12, 5], 4
    docs = [rng.integers(0, 512, size=n).astype(np.int32) for n in lens]
    splits = [Split(d + 1, "causal", n) for d, n in enumerate(lens)]
    length = sum(lens) + pad
    md = metadata_from_splits(splits, length)  # natural order: doc1, doc2, doc3, padding
    ids = np.concatenate(docs + [np.zeros(pad, np.int32)])
    position = np.concatenate([np.arange(n) for n in lens] + [np.zeros(pad, int)]).astype(np.int32)
    if layout == "mot_gen_slots":  # slots: doc1, doc2, padding | doc3
        u = lens[0] + lens[1] + pad
        perm = np.r_[0 : lens[0] + lens[1], sum(lens) : length, lens[0] + lens[1] : sum(lens)]
    else:
        u, perm = length, np.arange(length)
    meta = MaskMeta(**{k: jnp.asarray(v[perm])[None] for k, v in md.items()})
    und_logits, gen_logits = _run(
        cfg, params, ids[perm][None, :u], ids[perm][None, u:], jnp.asarray(position[perm])[None], meta
    )
    slots = np.concatenate([np.asarray(und_logits[0]), np.asarray(gen_logits[0])])
    natural = np.empty_like(slots)
    natural[perm] = slots  # un-permute to natural order
    start = 0
    for d, n in zip(docs, lens):
        assert _rel(natural[start : start + n], _hf_logits(model, d)) <= TOL
        start += n
    assert np.all(np.isfinite(natural[start:]))  # padding rows: finite (attend nothing)


def test_round_trip_and_scan_stacking():
    model = _hf_model("qwen3")
    cfg = _cfg(model, "mot")
    params = qwen2_to_params(model.state_dict(), cfg)
    back = params_to_qwen2(params, cfg)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    for key, value in sd.items():  # und keys equal the source; gen keys are copies
        np.testing.assert_array_equal(back[key], value, err_msg=key)
        if key.startswith("model.layers."):  # model.layers.i.{self_attn.q_proj | mlp | input_layernorm}…
            parts = key.split(".")
            parts[4 if parts[3] == "self_attn" else 3] += "_moe_gen"
            np.testing.assert_array_equal(back[".".join(parts)], value, err_msg=key)
    assert len(back) == 2 * len(sd) - 2  # gen copy of every layer key and of model.norm; not embed/lm_head
    scan_cfg = _cfg(model, "mot", scan_layers=True)
    scanned = qwen2_to_params(model.state_dict(), scan_cfg)["params"]
    jax.tree.map(np.testing.assert_array_equal, scanned, stack_layers(params["params"], 2))
    jax.tree.map(np.testing.assert_array_equal, unstack_layers(scanned), params["params"])
    # a BAGEL-style MoT state dict (explicit _moe_gen keys, prefixed) reads back exactly
    prefixed = {"language_model." + k: v for k, v in back.items()} | {"vit_model.x": np.zeros(1)}
    again = qwen2_to_params(prefixed, cfg, prefix="language_model.")
    jax.tree.map(np.testing.assert_array_equal, again, params)


def test_copy_to_gen_false_leaves_gen_out():
    model = _hf_model("qwen2")
    cfg = _cfg(model, "mot")
    tree = qwen2_to_params(model.state_dict(), cfg, copy_to_gen=False)["params"]
    assert "norm_moe_gen" not in tree and "mlp_moe_gen" not in tree["layers_0"]
    assert "q_proj" in tree["layers_0"]["self_attn"] and "q_proj_moe_gen" not in tree["layers_0"]["self_attn"]


def _bad(sd, change):
    sd = dict(sd)
    change(sd)
    return sd


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"), "model.layers.1.mlp.up_proj.weight: missing"),
        (
            lambda sd: sd.update({"model.layers.0.self_attn.o_proj.bias": np.zeros(64)}),
            "model.layers.0.self_attn.o_proj.bias: unexpected key",
        ),
        (
            lambda sd: sd.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((48, 64))}),
            "model.layers.0.self_attn.k_proj.weight: expected shape (64, 2, 16)",
        ),
        (lambda sd: sd.update({"lm_head.weight": np.zeros((500, 64))}), "lm_head.weight: expected shape (64, 512)"),
    ],
)
def test_converter_errors_name_the_key(change, message):
    model = _hf_model("qwen2")
    cfg = _cfg(model, "dense")
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    with pytest.raises(ConversionError) as err:
        qwen2_to_params(_bad(sd, change), cfg)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_gen_keys_rejected_for_dense():
    model = _hf_model("qwen2")
    sd = params_to_qwen2(qwen2_to_params(model.state_dict(), _cfg(model, "mot")), _cfg(model, "mot"))
    with pytest.raises(ConversionError, match="_moe_gen.*unexpected key"):
        qwen2_to_params(sd, _cfg(model, "dense"))


def test_rmsnorm_and_rope_match_hf_in_bfloat16():
    """Dtype casts: bf16 input, bf16 scale (as in BAGEL) → same bf16 values as Qwen2RMSNorm / HF RoPE."""
    from transformers.models.qwen2 import modeling_qwen2 as hq

    from bagel_jax.model.layers import RMSNorm, apply_rope, rope_cos_sin

    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 6, 4, 16)).astype(np.float32) * 3
    w = (1 + 0.2 * rng.normal(size=16)).astype(np.float32)
    ref = hq.Qwen2RMSNorm(16, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(w))
        want = ref(torch.from_numpy(x).to(torch.bfloat16)).float().numpy()
    got = RMSNorm(1e-6, jnp.bfloat16, "head_dim").apply(
        {"params": {"scale": jnp.asarray(w, jnp.bfloat16)}}, jnp.asarray(x, jnp.bfloat16)
    )
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=8e-3, atol=1e-6)

    position = rng.integers(0, 5000, size=(2, 6))
    conf = transformers.Qwen2Config(hidden_size=64, num_attention_heads=4, rope_theta=1_000_000.0)
    xb = torch.from_numpy(x).to(torch.bfloat16)
    cos_t, sin_t = hq.Qwen2RotaryEmbedding(conf)(xb, torch.from_numpy(position))
    want_q, _ = hq.apply_rotary_pos_emb(xb.transpose(1, 2), xb.transpose(1, 2), cos_t, sin_t)
    cos, sin = rope_cos_sin(jnp.asarray(position, jnp.int32), 16, 1_000_000.0, jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(cos, np.float32), cos_t.float().numpy())
    got_q = apply_rope(jnp.asarray(x, jnp.bfloat16), cos, sin)
    np.testing.assert_allclose(
        np.asarray(got_q, np.float32), want_q.transpose(1, 2).float().numpy(), rtol=8e-3, atol=8e-3
    )
