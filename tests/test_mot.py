"""MoT decoder: layout invariance against a per-token oracle, routing, dense equivalence, remat/scan.

Oracle choice: the module only routes by the modality-sorted layout (two static slices). The natural-
order reference is ``mot_oracle`` below, a plain-jnp forward that computes *both* experts for every
token and selects per token (``jnp.where(is_gen, gen, und)``) — it accepts any physical order, so it
runs on the natural order directly. It shares only the param tree and ``reference_attention`` (itself
checked against a naive softmax in test_mask.py) with the module.
"""

import functools
import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bagel_jax.attention import MaskMeta, Split, allowed, metadata_from_splits, reference_attention
from bagel_jax.config import CHOICES, REMAT_POLICIES, base_config, head_dim
from bagel_jax.convert.hf import stack_layers
from bagel_jax.model.mot import LanguageModel, init_params
from bagel_jax.model.remat import remat as remat_layer
from bagel_jax.parallel.rules import LOGICAL_AXIS_RULES, MESH_AXES, axis_rules

G = "_moe_gen"


def _cfg(**overrides):
    m = base_config().model  # configs/tiny.py's LLM shapes
    m.update(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        rope_theta=1_000_000.0,
        dtype="float32",
        param_dtype="float32",
        attention_impl="reference",
    )
    m.update(**overrides)
    return m


# --- the oracle -------------------------------------------------------------------------------------


def _rms(x, scale, eps):
    x32 = x.astype(jnp.float32)
    return scale * (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps))


@functools.partial(jax.jit, static_argnums=5)
def _oracle_jit(params, x, is_gen, position, meta, cfg_json):
    return mot_oracle(params, x, is_gen, position, meta, ml_collections.ConfigDict(json.loads(cfg_json)))


def mot_oracle(params, x, is_gen, position, meta, cfg):
    """Natural-order (any order) MoT forward: x [B, L, D], is_gen bool[B, L] → [B, L, D]."""
    p, eps, hd = params["params"], cfg.rms_norm_eps, head_dim(cfg)

    def pick(und, gen):
        return jnp.where(is_gen.reshape(is_gen.shape + (1,) * (und.ndim - 2)), gen, und)

    def both(fn, tree, name):
        return pick(fn(tree[name]), fn(tree[name + G]))

    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float32) / hd))
    ang = position[..., None].astype(jnp.float32) * inv_freq
    emb = jnp.concatenate([ang, ang], -1)[:, :, None]  # [B, L, 1, hd]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    rope = lambda t: t * cos + jnp.concatenate([-t[..., hd // 2 :], t[..., : hd // 2]], -1) * sin  # noqa: E731
    for i in range(cfg.num_layers):
        lp = p[f"layers_{i}"]
        a = lp["self_attn"]
        h = both(lambda w: _rms(x, w["scale"], eps), lp, "input_layernorm")
        proj = lambda w: jnp.einsum("bld,dhk->blhk", h, w["kernel"]) + w["bias"]  # noqa: E731
        q, k, v = both(proj, a, "q_proj"), both(proj, a, "k_proj"), both(proj, a, "v_proj")
        q = both(lambda w: _rms(q, w["scale"], eps), a, "q_norm")
        k = both(lambda w: _rms(k, w["scale"], eps), a, "k_norm")
        o = reference_attention(rope(q), rope(k), v, meta)
        x = x + both(lambda w: jnp.einsum("blhk,hkd->bld", o, w["kernel"]), a, "o_proj")
        h = both(lambda w: _rms(x, w["scale"], eps), lp, "post_attention_layernorm")

        def mlp(w, h=h):
            return (jax.nn.silu(h @ w["gate_proj"]["kernel"]) * (h @ w["up_proj"]["kernel"])) @ w["down_proj"]["kernel"]

        x = x + both(mlp, lp, "mlp")
    return both(lambda w: _rms(x, w["scale"], eps), p, "norm")


# --- rows: natural order and modality-sorted layout ---------------------------------------------------


def _doc(*segments):
    """segments: (kind, n tokens incl. markers). Returns [(mode, is_gen per token, position per token)]."""
    out, pos = [], 0
    for kind, n in segments:
        if kind == "text":
            out.append(("causal", [False] * n, list(range(pos, pos + n))))
            pos += n
        elif kind == "vit":  # <|vision_start|> patches <|vision_end|>: all und, one position
            out.append(("full", [False] * n, [pos] * n))
            pos += 1
        else:  # VAE image: markers und, latents gen; clean = full and advances, noised = noise and does not
            out.append(("full" if kind == "vae_clean" else "noise", [False] + [True] * (n - 2) + [False], [pos] * n))
            pos += kind == "vae_clean"
    return out


DOCS = {
    "t2i": _doc(("text", 4), ("vae_noised", 6)),
    "vlm": _doc(("vit", 5), ("text", 5)),
    "edit": _doc(("vae_clean", 5), ("vit", 4), ("text", 3), ("vae_noised", 5), ("text", 2)),
    "text_only": _doc(("text", 6)),
}
U, GEN = 40, 12  # und / gen slots per row


def _row(names):
    """Natural-order metadata and the slot → natural-index permutation of one row."""
    splits, is_gen, pos, doc_of = [], [], [], []
    for d, name in enumerate(names, start=1):
        for mode, gens, ps in DOCS[name]:
            splits.append(Split(d, mode, len(gens)))
            is_gen += gens
            pos += ps
            doc_of += [name] * len(gens)
    real, n_gen = len(is_gen), sum(is_gen)
    pad = U + GEN - real
    assert real - n_gen <= U and n_gen <= GEN
    md = metadata_from_splits(splits, U + GEN)
    pad_idx = list(range(real, U + GEN))
    und_slots = [i for i in range(real) if not is_gen[i]]
    gen_slots = [i for i in range(real) if is_gen[i]]
    n_und_pad = U - len(und_slots)
    perm = np.array(und_slots + pad_idx[:n_und_pad] + gen_slots + pad_idx[n_und_pad:])
    nat_gen = np.array(is_gen + [False] * n_und_pad + [True] * (pad - n_und_pad))  # padding: its slot's expert
    return dict(
        md=md,
        perm=perm,
        is_gen=nat_gen,
        position=np.array(pos + [0] * pad, np.int32),
        doc_of=np.array(doc_of + ["pad"] * pad),
    )


def _batch(rows):
    rows = [_row(r) for r in rows]
    nat = lambda key: np.stack([r[key] for r in rows])  # noqa: E731
    meta_nat = MaskMeta(**{k: jnp.asarray(np.stack([r["md"][k] for r in rows])) for k in rows[0]["md"]})
    perm = nat("perm")

    def take(a):  # natural → slot order along axis 1
        return np.take_along_axis(np.asarray(a), perm.reshape(perm.shape + (1,) * (np.ndim(a) - 2)), 1)

    meta_sorted = MaskMeta(
        *(jnp.asarray(take(a)) for a in (meta_nat.doc, meta_nat.index, meta_nat.q_hi, meta_nat.kv_hi))
    )
    return dict(
        meta_nat=meta_nat,
        meta_sorted=meta_sorted,
        perm=perm,
        take=take,
        is_gen=nat("is_gen"),
        position=nat("position"),
        doc_of=nat("doc_of"),
    )


def _unpermute(sorted_out, perm):
    out = np.empty_like(sorted_out)
    np.put_along_axis(out, perm[..., None], sorted_out, axis=1)
    return out


def _random_params(cfg, seed=0):
    """Every leaf random (norm scales 1 ± 0.1, the rest N(0, 0.1)) so swapped params are visible."""
    abstract = nn.unbox(jax.eval_shape(lambda: init_params(cfg, jax.random.key(seed))))
    rng = np.random.default_rng(seed)

    def draw(path, x):
        base = 1.0 if path[-1].key == "scale" else 0.0
        return (base + 0.1 * rng.normal(size=x.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract)


@functools.cache
def _jitted(cfg_json):
    cfg = ml_collections.ConfigDict(json.loads(cfg_json))
    return jax.jit(lambda p, u, g, pos, m: LanguageModel(cfg).apply(p, u, g, pos, m))


def _apply(cfg, params, und_x, gen_x, position, meta):
    """Jitted forward, one compile per (config, shapes); returns slot-order outputs [B, U+G, D]."""
    und_h, gen_h = _jitted(cfg.to_json())(params, und_x, gen_x, position, meta)
    return np.concatenate([np.asarray(und_h), np.asarray(gen_h)], axis=1)


ROWS = [["t2i", "vlm", "edit", "text_only"], ["edit", "text_only", "t2i"]]


@pytest.fixture(scope="module")
def setup():
    cfg = _cfg()
    params = _random_params(cfg)
    b = _batch(ROWS)
    x_nat = np.asarray(jax.random.normal(jax.random.key(7), (2, U + GEN, cfg.hidden_size)))
    x_sorted = b["take"](x_nat)
    pos_sorted = jnp.asarray(b["take"](b["position"]))
    return cfg, params, b, x_nat, x_sorted, pos_sorted


def test_layout_invariance_against_per_token_oracle(setup):
    cfg, params, b, x_nat, x_sorted, pos_sorted = setup
    oracle = lambda x, is_gen, pos, meta: np.asarray(  # noqa: E731
        _oracle_jit(params, jnp.asarray(x), jnp.asarray(is_gen), jnp.asarray(pos), meta, cfg.to_json())
    )
    ours = _unpermute(_apply(cfg, params, x_sorted[:, :U], x_sorted[:, U:], pos_sorted, b["meta_sorted"]), b["perm"])
    oracle_nat = oracle(x_nat, b["is_gen"], b["position"], b["meta_nat"])
    np.testing.assert_allclose(ours, oracle_nat, rtol=1e-5, atol=2e-5)
    # the oracle itself is layout invariant (sorted order in, natural order after un-permuting)
    oracle_sorted = oracle(x_sorted, b["take"](b["is_gen"]), pos_sorted, b["meta_sorted"])
    np.testing.assert_allclose(_unpermute(oracle_sorted, b["perm"]), oracle_nat, rtol=1e-5, atol=2e-5)
    # routing matters: treating every token as und is visibly different
    all_und = oracle(x_nat, np.zeros_like(b["is_gen"]), b["position"], b["meta_nat"])
    assert np.max(np.abs(all_und - oracle_nat)) > 1e-2


def _independent_of_gen(meta_sorted):
    """bool[B, L] (slot order): tokens from which no gen slot is reachable through the attention graph."""
    reach = np.asarray(allowed(meta_sorted))
    for _ in range(6):  # transitive closure (paths of length ≤ 64)
        reach = reach | (reach.astype(np.int32) @ reach.astype(np.int32) > 0)
    return ~reach[:, :, U:].any(-1)


def test_gen_perturbation_never_changes_und_only_documents(setup):
    cfg, params, b, _, x_sorted, pos_sorted = setup
    base = _apply(cfg, params, x_sorted[:, :U], x_sorted[:, U:], pos_sorted, b["meta_sorted"])
    gen_x = x_sorted[:, U:] + np.random.default_rng(3).normal(size=x_sorted[:, U:].shape).astype(np.float32)
    gen_params = jax.tree_util.tree_map_with_path(
        lambda path, x: x * 1.5 + 0.3 if any(G in str(k.key) for k in path) else x, params
    )
    moved_inputs = _apply(cfg, params, x_sorted[:, :U], gen_x, pos_sorted, b["meta_sorted"])
    moved_params = _apply(cfg, gen_params, x_sorted[:, :U], x_sorted[:, U:], pos_sorted, b["meta_sorted"])
    independent = _independent_of_gen(b["meta_sorted"])
    doc_sorted = b["take"](b["doc_of"])
    real = doc_sorted != "pad"
    # every token of the und-only document, and t2i's caption (before its noised image), is independent
    assert independent[doc_sorted == "text_only"].all() and independent[doc_sorted == "vlm"].all()
    assert independent[real & independent].size > independent[doc_sorted == "text_only"].size
    for moved in (moved_inputs, moved_params):
        np.testing.assert_array_equal(moved[independent & real], base[independent & real])
        assert np.min(np.max(np.abs(moved - base), -1)[~independent & real]) > 1e-4  # the rest does move


def _copy_und_to_gen(tree):
    expert_keys = (
        "norm",
        "input_layernorm",
        "post_attention_layernorm",
        "mlp",
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "q_norm",
        "k_norm",
    )
    out = {}
    for k, v in tree.items():
        out[k] = _copy_und_to_gen(v) if isinstance(v, dict) and k not in expert_keys else v
        if k in expert_keys:
            out[k + G] = v
    return out


def test_mot_with_gen_equal_und_equals_dense(setup):
    cfg, _, b, _, x_sorted, pos_sorted = setup
    dense_cfg = _cfg(layer_module="dense")
    dense = _random_params(dense_cfg, seed=5)
    mot = _copy_und_to_gen(dense)
    assert jax.tree.structure(mot) == jax.tree.structure(nn.unbox(init_params(cfg, jax.random.key(0))))
    args = (x_sorted[:, :U], x_sorted[:, U:], pos_sorted, b["meta_sorted"])
    np.testing.assert_allclose(_apply(cfg, mot, *args), _apply(dense_cfg, dense, *args), rtol=1e-5, atol=1e-5)


def test_no_gen_tokens_skips_gen_expert(setup):
    """G = 0 equals the same und tokens with an all-padding gen region (gen expert output unused)."""
    cfg, params, b, _, x_sorted, pos_sorted = setup
    meta0 = MaskMeta(
        *(
            a[:, :U]
            for a in (b["meta_sorted"].doc, b["meta_sorted"].index, b["meta_sorted"].q_hi, b["meta_sorted"].kv_hi)
        )
    )
    md = metadata_from_splits([Split(1, "causal", 30)], U + GEN)  # und docs only; gen slots = padding
    meta = MaskMeta(**{k: jnp.asarray(np.stack([v, v])) for k, v in md.items()})
    with_gen = _apply(cfg, params, x_sorted[:, :U], x_sorted[:, U:], pos_sorted, meta)
    meta0 = MaskMeta(*(a[:, :U] for a in (meta.doc, meta.index, meta.q_hi, meta.kv_hi)))
    no_gen = _apply(cfg, params, x_sorted[:, :U], x_sorted[:, U:U], pos_sorted[:, :U], meta0)
    assert no_gen.shape == (2, U, cfg.hidden_size)
    np.testing.assert_allclose(no_gen, with_gen[:, :U], rtol=1e-6, atol=1e-6)


def test_bfloat16_compute_close_to_float32(setup):
    """cfg.dtype=bfloat16 with f32 params: bf16 activations, within bf16 rounding of the f32 model."""
    cfg, params, b, _, x_sorted, pos_sorted = setup
    args = (x_sorted[:, :U], x_sorted[:, U:], pos_sorted, b["meta_sorted"])
    full = _apply(cfg, params, *args)
    half = _apply(_cfg(dtype="bfloat16"), params, *args)
    assert half.dtype == jnp.bfloat16
    assert np.max(np.abs(half.astype(np.float32) - full)) / np.max(np.abs(full)) < 3e-2


def _loss(cfg, params, b, x_sorted, pos_sorted):
    und_h, gen_h = LanguageModel(cfg).apply(params, x_sorted[:, :U], x_sorted[:, U:], pos_sorted, b["meta_sorted"])
    return jnp.sum(und_h**2) + jnp.sum(jnp.sin(gen_h))


@pytest.fixture(scope="module")
def plain_value_and_grad(setup):
    cfg, params, b, _, x_sorted, pos_sorted = setup
    return jax.jit(jax.value_and_grad(lambda p: _loss(cfg, p, b, x_sorted, pos_sorted)))(params)


@pytest.mark.parametrize(
    "scan, remat",
    # the named policies: every tag saved on device, offloaded to host, and the layer input offloaded
    [(False, "full"), (False, "dots"), (True, "none"), (True, "full")]
    + [(True, "save_qkv_attn"), (True, "offload_qkv_attn"), (True, "offload_input")],
)
def test_remat_and_scan_equal_plain_model(setup, plain_value_and_grad, scan, remat):
    """Loss and every param gradient equal the unscanned, un-remat'ed model."""
    cfg, params, b, _, x_sorted, pos_sorted = setup
    ref_val, ref_grad = plain_value_and_grad
    variant = _cfg(scan_layers=scan, remat=remat)
    vparams = {"params": stack_layers(params["params"], cfg.num_layers)} if scan else params
    val, grad = jax.jit(jax.value_and_grad(lambda p: _loss(variant, p, b, x_sorted, pos_sorted)))(vparams)
    np.testing.assert_allclose(val, ref_val, rtol=1e-6)
    if scan:
        ref_grad = {"params": stack_layers(ref_grad["params"], cfg.num_layers)}
    # f32 sums in another order (scan + full remat recompute): 1e-5 of each gradient's own scale
    jax.tree.map(
        lambda a, r: np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(r).max())), grad, ref_grad
    )


def test_remat_wraps_every_mode_config_accepts():
    """One table serves validation and the model: each accepted mode wraps a layer, any other names the key."""
    for mode in CHOICES["model.remat"]:
        assert (remat_layer(nn.Dense, mode) is nn.Dense) == (mode == "none")
    modes = r"\|".join(("none", *REMAT_POLICIES))
    with pytest.raises(ValueError, match=rf"^model\.remat must be one of {modes}, got 'selective'$"):
        remat_layer(nn.Dense, "selective")


@pytest.mark.parametrize("scan", [False, True])
def test_every_param_has_logical_axes(scan):
    boxed = jax.eval_shape(lambda: init_params(_cfg(scan_layers=scan), jax.random.key(0)))
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    known = {name for name, _ in LOGICAL_AXIS_RULES}
    for leaf in leaves:
        assert isinstance(leaf, nn.Partitioned) and len(leaf.names) == leaf.value.ndim
        assert set(leaf.names) <= known and (leaf.names[0] == "layers") == (
            scan and leaf.value.ndim > 1 and "layers" in leaf.names
        )


def test_sharded_forward_matches_single_device(setup):
    """Under an 8-device (data 2, fsdp 2, tensor 2) mesh, params sharded by the rules table, same output."""
    cfg, params, b, _, x_sorted, pos_sorted = setup
    mesh = jax.make_mesh((2, 2, 2, 1), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)
    boxed = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    args = (x_sorted[:, :U], x_sorted[:, U:], pos_sorted, b["meta_sorted"])
    args = jax.tree.map(lambda a: jnp.concatenate([a, a]), args)  # batch 4 over data×fsdp
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, LOGICAL_AXIS_RULES)
        sharded = jax.device_put(params, shardings)
        spec = sharded["params"]["layers_0"]["self_attn"]["q_proj"]["kernel"].sharding.spec
        assert tuple(spec) == ("fsdp", "tensor", None)
        out = _apply(cfg, sharded, *args)
    np.testing.assert_allclose(out, _apply(cfg, params, *args), rtol=1e-5, atol=1e-5)


def _collectives(hlo: str, where: str) -> list[str]:
    """The compiled module's collectives (all-gather, all-to-all, collective-permute, all-reduce) whose op_name
    contains ``where``."""
    ops = r"(all-gather|all-to-all|collective-permute|all-reduce)(-start)?\("
    return [line for line in hlo.splitlines() if re.search(r"= \S+ " + ops, line) and where in line]


@pytest.mark.parametrize("layer_module", ["mot", pytest.param("dense", marks=pytest.mark.slow)])
def test_sequence_parallel_matches_single_device_without_resharding(setup, layer_module):
    """sequence 2 (× fsdp 2 × tensor 2): the same outputs and input gradients as one device, and the und + gen join
    (seq_shards.py) moves no data: the only collectives of the attention block are the kernel's K/V all-gather
    along the sequence (and its transpose), none from joining, splitting or slicing the row."""
    cfg = _cfg(attention_impl="gpu", attention_block_q=16, attention_block_kv=16, layer_module=layer_module)
    params = _random_params(cfg)
    _, _, b, _, x_sorted, pos_sorted = setup

    def loss(p, u, g, pos, m):
        und_h, gen_h = LanguageModel(cfg).apply(p, u, g, pos, m)
        return jnp.sum(jnp.sin(und_h)) + jnp.sum(jnp.cos(gen_h))

    fn = jax.jit(jax.value_and_grad(loss, argnums=(1, 2)))
    args = (params, x_sorted[:, :U], x_sorted[:, U:], pos_sorted, b["meta_sorted"])
    want = fn(*args)
    mesh = jax.make_mesh((1, 2, 2, 2), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        compiled = fn.lower(*args).compile()
        got = compiled(*args)
    np.testing.assert_allclose(got[0], want[0], rtol=2e-5)
    for g, w in zip(got[1], want[1]):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5 * np.max(np.abs(w)))  # summation order
    hlo = compiled.as_text()
    attn = _collectives(hlo, "self_attn/")
    # allowed: the kernel's K/V all-gather (and its transpose), the tensor-parallel o_proj sum over head shards
    moved = [x for x in attn if "shard_map" not in x and not ("all-reduce" in x and "/o_proj" in x)]
    assert any("shard_map" in x and "all-gather" in x for x in attn) and not moved, "\n".join(moved)


def test_tensor_pair_saves_half_of_each_layer_input(setup):
    """A scanned, remat'ed stack on data 1 × fsdp 2 × tensor 2 keeps each layer's saved input split over the tensor
    pair (``activation_carry_embed``): the stacked [layers, rows, U, D] buffer holds D/2 per chip; same loss."""
    cfg, params, b, _, x_sorted, pos_sorted = setup
    variant = _cfg(scan_layers=True, remat="full")
    vparams = {"params": stack_layers(params["params"], cfg.num_layers)}
    auto = (jax.sharding.AxisType.Auto,) * 4
    mesh = jax.make_mesh((1, 2, 2, 1), MESH_AXES, axis_types=auto, devices=jax.devices()[:4])
    boxed = jax.eval_shape(lambda: init_params(variant, jax.random.key(0)))
    d, layers = cfg.hidden_size, cfg.num_layers
    found = {}
    for name, rules in (("split", LOGICAL_AXIS_RULES), ("whole", axis_rules({"activation_carry_embed": None}))):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            sharded = jax.device_put(vparams, nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules))
            fn = jax.jit(jax.value_and_grad(lambda p: _loss(variant, p, b, x_sorted, pos_sorted)))
            hlo = fn.lower(sharded).compile().as_text()
            val, _ = fn(sharded)
        np.testing.assert_allclose(val, _loss(cfg, params, b, x_sorted, pos_sorted), rtol=1e-5)
        # the scan's stacked saved inputs: [layers, local rows, U, width per chip]
        found[name] = {int(w) for w in re.findall(rf"f32\[{layers},1,{U},(\d+)\]", hlo)}
    assert d // 2 in found["split"] and d not in found["split"], found
    assert d in found["whole"], found
