"""The fused parameter update (train/update.py) against its oracle, optax's chain + apply_updates + EMA + selects.

Equal to float rounding (XLA:CPU contracts some multiply-adds into FMAs in one program and not the other) on random
trees, configs (clip or not, weight decay, lr factors, schedules, frozen modules) and guards, in
isolation and through the real train step (a NaN step included); and the fused update writes the state in place.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import train_toy as T
from bagel_jax.config import ConfigError, validate
from bagel_jax.convert import param_subtree
from bagel_jax.parallel.mesh import shard_batch
from bagel_jax.train import optim
from bagel_jax.train.update import fused_update, optax_update

# (path, shape): one leaf per module the freeze / lr_scale patterns tell apart
LEAVES = (
    ("vit_model/encoder/w", (3, 4)),
    ("connector/fc/kernel", (4, 5)),
    ("connector/fc/bias", (5,)),
    ("language_model/embed_tokens/embedding", (6, 5)),
    ("language_model/layers_0/q_proj/kernel", (5, 2, 3)),
    ("language_model/layers_0/mlp_moe_gen/up_proj/kernel", (5, 7)),
    ("language_model/lm_head/kernel", (5, 6)),
)


def _tree(values):
    out = {}
    for (path, _), v in zip(LEAVES, values, strict=True):
        node = out
        *heads, last = path.split("/")
        for h in heads:
            node = node.setdefault(h, {})
        node[last] = v
    return out


def _cfg(max_grad_norm, weight_decay, schedule, warmup, factors, freeze, b1, b2):
    c = T.toy_config().train
    c.update(
        lr=3e-2,
        min_lr=1e-4,
        steps=10,
        schedule=schedule,
        warmup_steps=warmup,
        max_grad_norm=max_grad_norm,
        weight_decay=weight_decay,
        freeze=freeze,
        beta1=b1,
        beta2=b2,
        eps=1e-15,
    )
    c.lr_scale.update(factors)
    return c


def _run_both(cfg, params, grad_steps, oks, decay=0.9):
    """[(fused, oracle) (params, opt_state, ema) after each step]."""
    tx, schedule = optim.make_optimizer(cfg, params)
    mask = optim.trainable_mask(params, tuple(cfg.freeze))
    mask_leaves = jax.tree.leaves(mask)
    ema = param_subtree.select(params, mask)
    fused = jax.jit(lambda p, g, s, e, ok: fused_update(cfg, schedule, p, g, s, e, mask_leaves, ok, decay))
    oracle = jax.jit(lambda p, g, s, e, ok: optax_update(tx, p, g, s, e, mask_leaves, ok, decay))
    a = b = (params, tx.init(params), ema)
    out = []
    for grads, ok in zip(grad_steps, oks, strict=True):
        a = fused(a[0], grads, a[1], a[2], jnp.asarray(ok))
        b = oracle(b[0], grads, b[1], b[2], jnp.asarray(ok))
        out.append((a, b))
    return out


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    phases=(Phase.explicit, Phase.reuse, Phase.generate),  # no shrinking: each example compiles two programs
)
@given(
    seed=st.integers(0, 2**31 - 1),
    max_grad_norm=st.sampled_from([0.0, 0.05, 1.0, 100.0]),
    weight_decay=st.sampled_from([0.0, 0.1]),
    schedule=st.sampled_from(["constant", "cosine"]),
    warmup=st.sampled_from([0, 2]),
    factors=st.sampled_from([{}, {"und": 0.1}, {"llm": 0.5, "gen": 3.0}, {"vit": 0.2, "connector": 2.0}]),
    freeze=st.sampled_from([(), ("vit",), ("und",), ("gen", "connector")]),
    betas=st.sampled_from([(0.9, 0.95), (0.5, 0.999), (0.0, 0.9)]),
    oks=st.lists(st.booleans(), min_size=1, max_size=4),
)
def test_fused_update_equals_optax(seed, max_grad_norm, weight_decay, schedule, warmup, factors, freeze, betas, oks):
    rng = np.random.default_rng(seed)
    params = _tree([jnp.asarray(rng.normal(size=s), jnp.float32) for _, s in LEAVES])
    grad_steps = []
    for ok in oks:
        scale = 10.0 ** rng.uniform(-3, 1)
        g = [rng.normal(size=s).astype(np.float32) * scale for _, s in LEAVES]
        if not ok:  # what the step's guard sees on a non-finite step: NaN/inf in the gradient
            g[rng.integers(len(g))].flat[0] = rng.choice([np.nan, np.inf])
        grad_steps.append(_tree([jnp.asarray(x) for x in g]))
    cfg = _cfg(max_grad_norm, weight_decay, schedule, warmup, factors, freeze, *betas)
    for i, (fused, oracle) in enumerate(_run_both(cfg, params, grad_steps, oks)):
        _assert_same(fused, oracle, f"step {i}")


def _assert_same(fused, oracle, msg=""):
    """(params, opt_state, ema) trees: the same structure and dtypes, integers equal, floats equal to rounding.

    Not bit for bit: XLA:CPU contracts some multiply-adds into FMAs, in one program's fusions and not in the
    other's, so the two differ by an ulp here and there (~1e-7 relative per step).
    """
    assert jax.tree.structure(fused) == jax.tree.structure(oracle)
    for part, a, b in zip(("params", "opt_state", "ema"), fused, oracle, strict=True):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            x, y = np.asarray(x), np.asarray(y)
            assert x.dtype == y.dtype, part
            if np.issubdtype(y.dtype, np.integer):
                np.testing.assert_array_equal(x, y, err_msg=f"{part} {msg}")
            else:
                scale = float(np.nanmax(np.abs(y), initial=1.0))
                np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6 * scale, err_msg=f"{part} {msg}")


def test_a_skipped_step_changes_nothing():
    params = _tree([jnp.full(s, 0.5, jnp.float32) for _, s in LEAVES])
    grads = _tree([jnp.full(s, np.nan, jnp.float32) for _, s in LEAVES])
    cfg = _cfg(1.0, 0.1, "constant", 0, {}, ("vit",), 0.9, 0.95)
    tx, _ = optim.make_optimizer(cfg, params)
    ((fused, _),) = _run_both(cfg, params, [grads], [False])
    mask = optim.trainable_mask(params, ("vit",))
    start = (params, tx.init(params), param_subtree.select(params, mask))
    for x, y in zip(jax.tree.leaves(fused), jax.tree.leaves(start), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_train_step_fused_and_optax_give_the_same_states():
    """Through the real step (frozen modules, a NaN batch in the middle): the two impls' states are identical."""
    runs = [
        T.toy_run(num_devices=1, data=1, train=(("freeze", ("vit",)), ("update_impl", impl)))
        for impl in ("fused", "optax")
    ]
    states = []
    for run in runs:
        data, state = T.ToyData(8), run.init()
        state, _ = run.run(state, data, 2)
        bad = next(data)
        bad["patches"][0, 0, 0] = np.nan
        state, metrics = run.step(state, shard_batch(bad, run.mesh, run.rules))
        assert int(metrics["nonfinite"]) == 1
        state, _ = run.run(state, data, 2)
        states.append(T.host_tree(state))
    fused, oracle = ((s.params, s.opt_state, s.ema_params) for s in states)
    _assert_same(fused, oracle)
    assert int(states[0].step) == int(states[1].step) == 5 and int(states[0].nonfinite_steps) == 1


def test_fused_update_writes_the_state_in_place():
    """Donated params, moments and EMA are updated in place: no f32 copy in the compiled update, whose temporaries
    are one tree (the clipped gradient). The oracle's selects read buffers its updates overwrite, so XLA:CPU (jax
    0.10) copies the state first: 36 copies and ~2 trees of temporaries here."""
    shapes = [(256, 512)] * 4 + [(512,)] * 4 + [(64, 2, 32)] * 4
    params = {"language_model": {f"w{i}": jnp.ones(s, jnp.float32) for i, s in enumerate(shapes)}}
    grads = jax.tree.map(lambda p: p * 1e-3, params)
    cfg = _cfg(1.0, 0.1, "constant", 0, {}, (), 0.9, 0.95)
    tx, schedule = optim.make_optimizer(cfg, params)
    mask = optim.trainable_mask(params, ())
    mask_leaves = jax.tree.leaves(mask)

    def update(p, s, e, g):  # ok from the gradient, as in the step (a constant guard would fold away)
        ok = jnp.isfinite(optim.trainable_global_norm(g, mask))
        return fused_update(cfg, schedule, p, g, s, e, mask_leaves, ok, 0.9)

    ema = jax.tree.map(jnp.copy, param_subtree.select(params, mask))
    compiled = jax.jit(update, donate_argnums=(0, 1, 2)).lower(params, tx.init(params), ema, grads).compile()
    assert not re.findall(r"= f32\[[0-9,]*\]\{[0-9,]*\} copy\(", compiled.as_text())
    tree_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    assert compiled.memory_analysis().temp_size_in_bytes <= 1.05 * tree_bytes


def test_bad_update_impl_is_one_line():
    config = T.toy_config()
    config.train.update_impl = "adam"
    with pytest.raises(ConfigError, match=r"^train\.update_impl: "):
        validate(config)


def test_auto_is_fused_on_one_device_and_optax_on_several():
    config = T.toy_config()
    assert config.train.update_impl == "auto"
    assert optim.update_impl(config, 1) == "fused" and optim.update_impl(config, 8) == "optax"
    config.train.update_impl = "fused"
    assert optim.update_impl(config, 8) == "fused"
    del config.train["update_impl"]  # a config saved before the key existed
    assert optim.update_impl(config, 1) == "fused"


def test_fused_update_on_a_sharded_mesh_has_the_oracles_collectives():
    """On 8 devices (fsdp 4 × tensor 2, leaves sharded both ways, sharded on one axis and replicated) the fused update
    compiles to exactly the oracle's collectives (the global norm's all-reduce: the update itself is per shard) and
    gives its values; the state keeps its shardings."""
    from collections import Counter

    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("fsdp", "tensor"))
    specs = [P("fsdp", "tensor"), P("tensor", None), P(None), P("fsdp", None), P("fsdp", "tensor", None), P(), P()]
    shapes = [(8, 6), (4, 5), (5,), (8, 5), (8, 2, 3), (5, 7), (5, 6)]
    rng = np.random.default_rng(0)
    leaves = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]

    def put(vals):
        return _tree([jax.device_put(v, NamedSharding(mesh, s)) for v, s in zip(vals, specs, strict=True)])

    params, grads = put(leaves), put([v * 0.3 + 0.1 for v in leaves])
    cfg = _cfg(0.05, 0.1, "cosine", 2, {"und": 0.1}, ("vit",), 0.9, 0.95)
    tx, schedule = optim.make_optimizer(cfg, params)
    mask = optim.trainable_mask(params, tuple(cfg.freeze))
    mask_leaves = jax.tree.leaves(mask)
    ema = param_subtree.select(params, mask)
    state = jax.jit(tx.init)(params)

    def run(update):
        ok = jnp.isfinite(optim.trainable_global_norm(grads, mask))
        fn = jax.jit(lambda p, g, s, e, ok: update(p, g, s, e, mask_leaves, ok, 0.9))
        compiled = fn.lower(params, grads, state, ema, ok).compile()
        kinds = re.findall(
            r" (all-gather|all-reduce|collective-permute|reduce-scatter|all-to-all)\(", compiled.as_text()
        )
        return Counter(kinds), compiled(params, grads, state, ema, ok)

    fused_kinds, fused = run(lambda *a: fused_update(cfg, schedule, *a))
    oracle_kinds, oracle = run(lambda *a: optax_update(tx, *a))
    assert fused_kinds == oracle_kinds and set(fused_kinds) == {"all-reduce"}, (fused_kinds, oracle_kinds)
    _assert_same(fused, oracle)
    for new, old in zip(jax.tree.leaves(fused[0]), jax.tree.leaves(params), strict=True):
        assert new.sharding.is_equivalent_to(old.sharding, new.ndim)
