"""LoRA (model/lora.py): B = 0 gives the base model exactly; only adapters train (small optimizer state, base
bitwise unchanged, the loss falls); the export merges W + (alpha/rank)·A·B in the release layout and the merged
base model computes what the adapted one does; adapters shard like their kernels; bad LoRA config is one line."""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bagel_testlib as lib
from bagel_jax.attention import MaskMeta, Split, metadata_from_splits
from bagel_jax.config import ConfigError, base_config, validate
from bagel_jax.convert import bagel_ckpt as bc
from bagel_jax.convert.export import release_tensors
from bagel_jax.convert.hf import stack_layers
from bagel_jax.model.lora import is_lora_path, merge_kernel
from bagel_jax.model.mot import LanguageModel
from bagel_jax.parallel.rules import LOGICAL_AXIS_RULES
from bagel_jax.train import optim

U, G, B = 12, 6, 2


def _cfg(rank=0, **lora):
    m = base_config().model
    m.update(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        dtype="float32",
        param_dtype="float32",
        attention_impl="reference",
    )
    m.lora.update(rank=rank, alpha=8.0, **lora)
    return m


def _meta():
    md = metadata_from_splits([Split(1, "causal", U + G)], U + G)
    return MaskMeta(**{k: jnp.asarray(np.stack([v] * B)) for k, v in md.items()})


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    ids = jnp.asarray(rng.integers(0, 96, (B, U)), jnp.int32)
    gen = jnp.asarray(rng.normal(size=(B, G, 32)), jnp.float32)
    target = jnp.asarray(rng.normal(size=(B, G, 32)), jnp.float32)
    return ids, gen, target


def _forward(cfg):
    model, meta, pos = LanguageModel(cfg), _meta(), jnp.broadcast_to(jnp.arange(U + G), (B, U + G))

    def run(m, ids, gen):
        und_h, gen_h = m(m.embed(ids), gen, pos, meta)
        return m.logits(und_h), gen_h

    return model, run


def _init(cfg, seed=0):
    model, run = _forward(cfg)
    ids, gen, _ = _inputs()
    return nn.meta.unbox(model.init(jax.random.PRNGKey(seed), ids, gen, method=run))["params"]


def _apply(cfg, params, ids, gen):
    model, run = _forward(cfg)
    return model.apply({"params": params}, ids, gen, method=run)


def _flat(tree):
    return {optim.param_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _with_base(lora_params, base_params):
    """``lora_params`` with every base leaf replaced by ``base_params``' (so the comparison is of one model)."""
    base = _flat(base_params)
    return jax.tree_util.tree_map_with_path(lambda p, x: base.get(optim.param_path(p), x), lora_params)


def _loss(cfg, params, ids, gen, target):
    logits, gen_h = _apply(cfg, params, ids, gen)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()
    return ce + jnp.mean((gen_h - target) ** 2)


@pytest.mark.parametrize("scan", [False, True])
def test_lora_at_init_is_exactly_the_base_model(scan):
    base_cfg, lora_cfg = _cfg(), _cfg(rank=4)
    base_cfg.scan_layers = lora_cfg.scan_layers = scan
    base = _init(base_cfg)
    adapted = _with_base(_init(lora_cfg, seed=1), base)
    flat = _flat(adapted)
    assert {p for p in flat if is_lora_path(p)}, "no adapters were created"
    assert set(_flat(base)) == {p for p in flat if not is_lora_path(p)}  # the base tree is unchanged
    assert all(np.any(np.asarray(x) != 0) for p, x in flat.items() if p.endswith("lora_a"))
    ids, gen, _ = _inputs()
    for ours, ref in zip(_apply(lora_cfg, adapted, ids, gen), _apply(base_cfg, base, ids, gen), strict=True):
        if scan:  # inside the scan XLA merges the k and v dots differently once adapters are there: <= 1 ulp
            np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=0, atol=2.5e-7)
        else:
            np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))


@pytest.mark.parametrize(
    "experts,targets,expected",
    [
        (("und", "gen"), ("q", "k", "v", "o", "mlp"), 2 * 2 * 7),
        (("gen",), ("q", "v"), 2 * 2),
        (("und",), ("mlp",), 2 * 3),
    ],
)
def test_adapters_go_where_configured(experts, targets, expected):
    flat = _flat(_init(_cfg(rank=2, experts=experts, targets=targets)))
    adapted = {p.rsplit("/", 1)[0] for p in flat if is_lora_path(p)}
    assert len(adapted) == expected
    for p in adapted:
        assert ("_moe_gen" in p) == (experts == ("gen",)) or len(experts) == 2
        kind = p.rsplit("/", 1)[1].split("_")[0]
        assert (kind if kind in ("q", "k", "v", "o") else "mlp") in targets


def test_only_adapters_train_base_bitwise_unchanged_loss_falls():
    cfg = _cfg(rank=4)
    params = _init(cfg)
    train_cfg = base_config().train
    train_cfg.update(lr=1e-2, warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0)
    tx, _ = optim.make_optimizer(train_cfg, params)
    opt_state = tx.init(params)
    mask = _flat(optim.trainable_mask(params))
    n_train = sum(np.size(x) for p, x in _flat(params).items() if mask[p])
    n_all = sum(np.size(x) for x in jax.tree.leaves(params))
    adapter_bytes = sum(x.nbytes for p, x in _flat(params).items() if is_lora_path(p))
    opt_bytes = sum(x.nbytes for x in jax.tree.leaves(opt_state))
    print(
        f"LoRA rank 4: {n_train} trainable of {n_all} params ({100 * n_train / n_all:.1f}%); optimizer state "
        f"{opt_bytes} bytes (adapters {adapter_bytes} bytes; full fine-tune would need {8 * n_all})"
    )
    assert all(mask[p] == is_lora_path(p) for p in mask)
    assert n_train < 0.25 * n_all
    assert opt_bytes <= 2 * adapter_bytes + 64  # AdamW's mu and nu for the adapters, plus step counters

    ids, gen, target = _inputs()
    loss_grad = jax.jit(jax.value_and_grad(lambda p: _loss(cfg, p, ids, gen, target)))

    @jax.jit
    def step(p, s):
        loss, g = loss_grad(p)
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s, loss

    before, trained = jax.tree.map(np.asarray, params), params
    losses = []
    for _ in range(15):
        trained, opt_state, loss = step(trained, opt_state)
        losses.append(float(loss))
    assert losses[-1] < 0.9 * losses[0], losses
    after = _flat(jax.tree.map(np.asarray, trained))
    for p, x in _flat(before).items():
        if is_lora_path(p):
            if p.endswith("lora_b"):
                assert np.any(after[p] != 0), p
        else:
            assert after[p].tobytes() == x.tobytes(), f"frozen base param {p} changed"


def _random_adapters(lm: dict, cfg, rng) -> dict:
    """Adds random lora_a / lora_b to every adapted module of an (unstacked) language_model param tree."""
    n_in = {"o_proj": 2}
    r = cfg.lora.rank
    for name, layer in lm.items():
        if not name.startswith("layers_"):
            continue
        modules = [(k, v) for k, v in layer["self_attn"].items() if k[0] in "qkvo" and k.split("_")[1] == "proj"]
        modules += [(k, v) for mlp, sub in layer.items() if mlp.startswith("mlp") for k, v in sub.items()]
        for key, mod in modules:
            k = n_in.get(key.removesuffix("_moe_gen"), 1)
            w = mod["kernel"]
            mod["lora_a"] = rng.normal(size=(*w.shape[:k], r)).astype(np.float32)
            mod["lora_b"] = rng.normal(size=(r, *w.shape[k:])).astype(np.float32)
    return lm


@pytest.mark.parametrize("scan", [False, True])
def test_export_merges_base_plus_scale_BA(tmp_path, scan):
    config = lib.tiny_config()
    cfg = config.model
    cfg.scan_layers = scan
    cfg.lora.update(rank=3, alpha=6.0)
    bc.write_random_checkpoint(str(tmp_path), cfg, seed=1)
    base = bc.load_params(str(tmp_path), cfg)  # stacked when scan_layers
    plain = cfg.copy_and_resolve_references()
    plain.scan_layers = False
    unstacked = bc.load_params(str(tmp_path), plain)
    lm = _random_adapters(jax.tree.map(np.copy, unstacked["language_model"]), cfg, np.random.default_rng(0))
    adapted = {**base, "language_model": stack_layers(lm, cfg.num_layers) if scan else lm}
    got = dict(release_tensors(adapted, cfg))
    want = dict(release_tensors(base, cfg))
    assert set(got) == set(want) == set(bc.official_shapes(plain))
    scale, merged = 6.0 / 3, 0
    for key, path, _kind in bc.entries(plain):
        mod = lm if path[0] == "language_model" else {}
        for p in path[1:-1]:
            mod = mod.get(p, {})
        if path[-1] == "kernel" and "lora_a" in mod:
            a, b = mod["lora_a"], mod["lora_b"]
            r = a.shape[-1]
            torch_delta = b.reshape(r, -1).T @ a.reshape(-1, r).T  # [out, in], the PEFT convention B·A
            np.testing.assert_allclose(got[key], want[key] + scale * torch_delta, rtol=1e-5, atol=1e-5, err_msg=key)
            merged += 1
        else:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert merged == 2 * cfg.num_layers * 7


def test_merged_base_model_computes_the_adapted_model():
    cfg, base_cfg = _cfg(rank=4), _cfg()
    params = _init(cfg)
    rng = np.random.default_rng(3)
    params = jax.tree_util.tree_map_with_path(  # a trained-looking adapter: B ≠ 0
        lambda p, x: (
            jnp.asarray(rng.normal(size=x.shape) * 0.1, x.dtype) if optim.param_path(p).endswith("lora_b") else x
        ),
        params,
    )

    def merge(tree, name=None):
        if isinstance(tree, dict) and "kernel" in tree:
            return {
                "kernel": jnp.asarray(merge_kernel(name, tree, tree["kernel"], cfg)),
                **{k: v for k, v in tree.items() if k not in ("kernel", "lora_a", "lora_b")},
            }
        return {k: merge(v, k) for k, v in tree.items()} if isinstance(tree, dict) else tree

    merged = merge(jax.tree.map(np.asarray, params))
    assert not any(is_lora_path(p) for p in _flat(merged))
    ids, gen, _ = _inputs()
    for ours, ref in zip(_apply(cfg, params, ids, gen), _apply(base_cfg, merged, ids, gen), strict=True):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=2e-4, atol=2e-4)


def test_adapters_shard_like_their_kernels():
    model, run = _forward(_cfg(rank=4))
    ids, gen, _ = _inputs()
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids, gen, method=run))["params"]
    specs = _flat(nn.logical_to_mesh(nn.get_partition_spec(boxed), LOGICAL_AXIS_RULES))
    checked = 0
    for p, spec in specs.items():
        if p.endswith("lora_a"):
            mod = p.rsplit("/", 1)[0]
            kernel, b = specs[mod + "/kernel"], specs[mod + "/lora_b"]
            n_in = 2 if "/o_proj" in mod else 1
            assert tuple(spec)[:n_in] == tuple(kernel)[:n_in] and tuple(spec)[n_in] is None, p
            assert tuple(b)[0] is None and tuple(b)[1:] == tuple(kernel)[n_in:], p
            checked += 1
    assert checked == 2 * 2 * 7


@pytest.mark.parametrize(
    "update,key",
    [
        (dict(rank=17), "model.lora.rank"),  # > the k/v layers' smaller dim (2 kv heads × 8 = 16)
        (dict(rank=-1), "model.lora.rank"),
        (dict(rank=4, targets=("q", "attn")), "model.lora.targets"),
        (dict(rank=4, experts=("vit",)), "model.lora.experts"),
        (dict(rank=4, alpha=0.0), "model.lora.alpha"),
    ],
)
def test_bad_lora_config_is_one_line(update, key):
    config = base_config()
    config.model.update(hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2)
    config.model.lora.update(update)
    with pytest.raises(ConfigError) as e:
        validate(config)
    msg = str(e.value)
    assert msg.startswith(key + ":") and "\n" not in msg, msg


def test_rank_up_to_the_smaller_dim_is_accepted_and_dense_has_no_gen_expert():
    config = base_config()
    config.model.update(hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2)
    config.model.lora.update(rank=16)
    validate(config)
    config.model.update(layer_module="dense")
    with pytest.raises(ConfigError, match=r"^model.lora.experts: .*no gen expert"):
        validate(config)


def test_release_init_keeps_fresh_adapters_sharded_by_the_rules(tmp_path):
    """LoRA on the release (fsdp 4 × tensor 2 on 8 CPU devices): the base = the converter's params bitwise, the
    adapters = their fresh init (B = 0), every leaf (adapters included) with the rules' sharding."""
    from bagel_jax.convert.release_sharded import load_release_sharded
    from bagel_jax.model.bagel import make_init_fn
    from bagel_jax.parallel.mesh import logical_rules, make_mesh
    from bagel_jax.train.state import state_shardings

    config = lib.tiny_config()
    config.model.lora.update(rank=4, targets=("q", "o", "mlp"))
    config.data.batch_size = 8
    config.parallel.update(data=1, fsdp=4, tensor=2)
    bc.write_random_checkpoint(str(tmp_path), config.model, seed=5)
    _, init_fn = make_init_fn(config)
    tx, _ = optim.make_optimizer(config.train, jax.eval_shape(init_fn, jax.random.PRNGKey(0)))
    mesh, rules = make_mesh(config, jax.devices()), logical_rules(config)
    shardings = state_shardings(init_fn, tx, mesh, rules).params
    with mesh, nn.logical_axis_rules(rules):
        fresh = jax.jit(lambda k: nn.unbox(init_fn(k)), out_shardings=shardings)(jax.random.PRNGKey(0))
    loaded = _flat(load_release_sharded(str(tmp_path), config.model, shardings, fresh))
    want, fresh, specs = _flat(bc.load_params(str(tmp_path), config.model)), _flat(fresh), _flat(shardings)
    assert set(loaded) == set(want) | {p for p in fresh if is_lora_path(p)}
    adapters = 0
    for p, x in loaded.items():
        assert x.sharding == specs[p], p
        if is_lora_path(p):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(fresh[p]), err_msg=p)
            assert p.endswith("lora_a") or not np.any(np.asarray(x)), p
            adapters += 1
        else:
            np.testing.assert_array_equal(np.asarray(x), want[p], err_msg=p)
    assert adapters == 2 * 2 * config.model.num_layers * 5  # (A, B) × experts × layers × (q, o, gate, up, down)
    assert any(s is not None for p in loaded if is_lora_path(p) for s in specs[p].spec)


def test_trainer_with_lora_keeps_the_base_and_exports_it_merged(tmp_path):
    """tiny_shapes + LoRA through the trainer (3 steps): the base params of every checkpoint are the same bits,
    the adapters move, and the export of the run is base + (alpha/rank)·B·A in the release layout."""
    from safetensors.numpy import load_file

    from bagel_jax.convert.export import export_run
    from bagel_jax.convert.fixed_params import fixed_params
    from bagel_jax.convert.run_checkpoint import load_params
    from bagel_jax.model.bagel import make_init_fn
    from bagel_jax.train.train import train
    from configs_util import shipped_config

    c = shipped_config("tiny_shapes")
    # und only: a fresh model's zero-initialised llm2vae (frozen under LoRA) passes no gradient to the gen expert
    c.model.lora.update(rank=4, alpha=8.0, experts=("und",))
    c.train.update(steps=3, checkpoint_every=1, keep_checkpoints=0, lr=1e-2, warmup_steps=0)
    c.data.update(synthetic_examples=24)
    workdir, out = str(tmp_path / "run"), str(tmp_path / "release")
    train(c, workdir, devices=jax.devices()[:1])
    abstract = nn.unbox(jax.eval_shape(make_init_fn(c)[1], jax.random.PRNGKey(0)))
    fixed = fixed_params(c, make_init_fn(c)[1])  # the frozen VAE and sin-cos tables: rebuilt, not checkpointed
    first, last = (
        _flat(jax.device_get(load_params(os.path.join(workdir, "checkpoints", str(s)), abstract, base=fixed)))
        for s in (1, 3)
    )
    for p, x in first.items():
        if is_lora_path(p):
            assert p.endswith("lora_a") or np.any(last[p] != x), f"adapter {p} did not train"
        else:
            assert last[p].tobytes() == x.tobytes(), f"frozen base param {p} changed"
    export_run(workdir, out, which="params", dtype="float32", devices=jax.devices()[:1])
    got = load_file(os.path.join(out, bc.EMA_FILE))
    merged = 0
    for key, path, kind in bc.entries(c.model):
        mod = "/".join(path[:-1])
        if path[-1] == "kernel" and mod + "/lora_a" in last:
            w = last[mod + "/kernel"] + 2.0 * delta_ab(last[mod + "/lora_a"], last[mod + "/lora_b"], path[-2])
            np.testing.assert_allclose(got[key], bc.to_official(kind, w), rtol=1e-6, atol=1e-6, err_msg=key)
            merged += 1
        else:
            np.testing.assert_array_equal(got[key], bc.to_official(kind, last["/".join(path)]), err_msg=key)
    assert merged == c.model.num_layers * 7


def delta_ab(a, b, module):
    """A·B in the kernel's layout, written out per kind (independent of model/lora.py)."""
    if module.startswith("o_proj"):
        return np.einsum("hkr,rd->hkd", a, b)
    if module.startswith(("q_proj", "k_proj", "v_proj")):
        return np.einsum("dr,rhk->dhk", a, b)
    return a @ b


# --- params saved with LoRA, loaded into a model with other (or no) adapters ----------------------------------------


def _trained_lora(cfg, seed=3):
    """Host params of ``cfg`` with a trained-looking adapter: B random, nonzero."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: np.asarray(
            rng.normal(size=x.shape) * 0.1 if optim.param_path(p).endswith("lora_b") else x, np.float32
        ),
        _init(cfg),
    )


def _nested(flat: dict) -> dict:
    """A nested dict of '/'-joined paths → leaves."""
    out: dict = {}
    for p, x in flat.items():
        *parents, leaf = p.split("/")
        node = out
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = x
    return out


def _abstract(cfg, mesh: bool = False):
    """The params of ``cfg`` as ``ShapeDtypeStruct``s, with ``mesh``: sharded by the rules on fsdp 4 × tensor 2."""
    model, run = _forward(cfg)
    ids, gen, _ = _inputs()
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids, gen, method=run))["params"]
    if not mesh:
        return nn.unbox(boxed)
    from bagel_jax.parallel.mesh import logical_rules, make_mesh

    config = base_config()
    config.parallel.update(data=1, fsdp=4, tensor=2)
    mesh, rules = make_mesh(config, jax.devices()), logical_rules(config)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed), shardings)


def _check_merged(loaded, saved, scale) -> int:
    """``loaded`` (no adapters) = ``saved``'s base with every adapter merged, W + scale·A·B (written out here);
    returns how many (per layer)."""
    loaded, saved = _flat(jax.device_get(loaded)), _flat(saved)
    assert set(loaded) == {p for p in saved if not is_lora_path(p)}
    merged = 0
    for p, x in loaded.items():
        mod = p.rsplit("/", 1)[0]
        if p.endswith("/kernel") and mod + "/lora_a" in saved:
            a, b, name = saved[mod + "/lora_a"], saved[mod + "/lora_b"], mod.rsplit("/", 1)[1]
            stacked = p.startswith("layers/")  # scan form: [layers, ...]
            d = (
                np.stack([delta_ab(ai, bi, name) for ai, bi in zip(a, b, strict=True)])
                if stacked
                else delta_ab(a, b, name)
            )
            np.testing.assert_allclose(x, saved[p] + scale * d, rtol=1e-6, atol=1e-6, err_msg=p)
            assert np.abs(scale * d).max() > 1e-3, p  # the adapter matters
            merged += len(a) if stacked else 1
        else:
            assert x.tobytes() == saved[p].tobytes(), p
    return merged


@pytest.mark.parametrize("source", ["params_tree", "run_ema"])
def test_lora_params_load_into_a_model_without_lora_merged(tmp_path, caplog, source):
    """A LoRA params tree (alpha = the loader's model.lora.alpha; one device) or a LoRA run's workdir (alpha from its
    config.json; the EMA's adapters; layers scanned, fsdp 4 × tensor 2) loaded into the model without LoRA:
    W + (alpha/rank)·A·B on the kernel's sharding, one log line, and the merged model computes what the adapted one
    does."""
    import json
    import logging

    import orbax.checkpoint as ocp

    from bagel_jax.convert.layer_stack import unstack_layers
    from bagel_jax.convert.run_checkpoint import load_params

    cfg, base_cfg = _cfg(rank=4), _cfg()
    saved, path, run = _trained_lora(cfg), tmp_path / "saved", source == "run_ema"
    if not run:
        tree, alpha, used = saved, 8.0, saved
    else:  # a run: checkpoints/<step>/state holds the params and the adapters' EMA; config.json the run's alpha
        cfg.lora.alpha = 6.0
        ema = _nested({p: x * 0.5 for p, x in _flat(saved).items() if is_lora_path(p)})
        used = _nested({**_flat(saved), **_flat(ema)})
        tree, alpha = {"params": stack_layers(saved, 2), "ema_params": stack_layers(ema, 2)}, None
        (path / "checkpoints").mkdir(parents=True)
        (path / "config.json").write_text(json.dumps({"model": {"lora": {"rank": 4, "alpha": 6.0}}}))
    with ocp.StandardCheckpointer() as saver:
        saver.save(path / "checkpoints" / "1" / "state" if run else path, tree)
    target = base_cfg.copy_and_resolve_references()
    target.scan_layers = run
    abstract = _abstract(target, mesh=run)
    with caplog.at_level(logging.INFO):
        loaded = load_params(str(path), abstract, use_ema=run, lora_alpha=alpha)
    assert [m for m in caplog.messages if "merged 28 LoRA adapters" in m], caplog.messages
    if run:
        specs = _flat(abstract)
        assert all(x.sharding == specs[p].sharding for p, x in _flat(loaded).items())
        assert any(s is not None for s in specs["layers/self_attn/o_proj/kernel"].sharding.spec)
        loaded = unstack_layers(jax.device_get(loaded))
    assert _check_merged(loaded, used, cfg.lora.alpha / 4) == 2 * 2 * 7
    ids, gen, _ = _inputs()
    for ours, ref in zip(_apply(base_cfg, loaded, ids, gen), _apply(cfg, used, ids, gen), strict=True):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-5, atol=1e-6)


def _init_from(tmp_path, saved, rank, **lora):
    """A config of the tiny decoder with LoRA ``rank`` whose ``train.init_from`` is ``saved`` (written once, as a
    params tree)."""
    import orbax.checkpoint as ocp

    path = tmp_path / "saved"
    if not path.exists():
        with ocp.StandardCheckpointer() as saver:
            saver.save(path, saved)
    config = base_config()
    config.model = _cfg(rank, **lora)
    config.train.init_from = str(path)
    return config


def test_lora_params_into_another_rank_merged_then_fresh_adapters(tmp_path):
    """Rank 4 saved, rank 2 configured: the saved adapters are merged into the base and this model's are as it
    initialised them (B = 0, which computes the base exactly: test_lora_at_init_is_exactly_the_base_model), so the
    loaded model computes what the saved one does."""
    from bagel_jax.model.lora import without_adapters
    from bagel_jax.train.checkpoint import load_init_params

    saved = _trained_lora(_cfg(rank=4))
    config = _init_from(tmp_path, saved, rank=2)
    rng = np.random.default_rng(5)
    like = jax.tree_util.tree_map_with_path(  # "fresh": A random, B = 0
        lambda p, x: jnp.asarray(rng.normal(size=x.shape) * (not optim.param_path(p).endswith("lora_b")), x.dtype),
        _abstract(config.model),
    )
    loaded = load_init_params(config, jax.tree.map(lambda x: x.sharding, like), like)
    assert _check_merged(without_adapters(loaded), saved, 8.0 / 4) == 2 * 2 * 7
    flat, fresh = _flat(loaded), _flat(like)
    assert {p for p in flat if is_lora_path(p)} == {p for p in fresh if is_lora_path(p)}
    for p, x in fresh.items():
        if is_lora_path(p):
            assert np.asarray(flat[p]).tobytes() == np.asarray(x).tobytes(), p


@pytest.mark.parametrize(
    "lora,key,saved_value,ours",
    [
        (dict(targets=("q", "k", "v")), "targets", "('q', 'v')", "('k', 'q', 'v')"),
        (dict(targets=("q", "v"), experts=("und",)), "experts", "('gen', 'und')", "('und',)"),
    ],
)
def test_lora_params_into_other_adapted_layers_is_one_line(tmp_path, lora, key, saved_value, ours):
    """Adapters saved on other layers than the model adapts: one line naming the key and both values, from the
    metadata (the preflight check); the same layout loads as saved."""
    from bagel_jax.train.checkpoint import check_init_from, lora_init_plan

    saved = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), _abstract(_cfg(rank=4, targets=("q", "v"))))
    with pytest.raises(ConfigError) as e:
        check_init_from(_init_from(tmp_path, saved, rank=4, **lora))
    msg = str(e.value)
    assert msg.startswith(f"model.lora.{key}:") and "\n" not in msg, msg
    assert saved_value in msg and ours in msg, msg
    assert lora_init_plan(_init_from(tmp_path, saved, rank=4, targets=("v", "q"))) == "load"
    assert lora_init_plan(_init_from(tmp_path, saved, rank=0)) == "load"  # merged by load_params
