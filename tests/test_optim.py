"""Optimizer (vs torch AdamW + clip_grad_norm_ + HF schedules), freezing, EMA, NaN skipping, accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import train_toy as T
from bagel_jax.config import ConfigError
from bagel_jax.convert import param_subtree
from bagel_jax.parallel.mesh import shard_batch
from bagel_jax.train import optim
from bagel_jax.train.nonfinite import NonFiniteError, NonFiniteGuard


def _train_cfg(**kw):
    c = T.toy_config().train
    c.update(kw)
    return c


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_schedule_matches_transformers(schedule):
    import torch  # a pinned test dependency: missing is a broken install, not a skip
    from transformers import optimization as hf

    cfg = _train_cfg(schedule=schedule, lr=3e-4, min_lr=1e-5, warmup_steps=5, steps=40)
    ours = optim.make_schedule(cfg)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    if schedule == "constant":
        sched = hf.get_constant_schedule_with_warmup(opt, cfg.warmup_steps)
    else:
        sched = hf.get_cosine_with_min_lr_schedule_with_warmup(opt, cfg.warmup_steps, cfg.steps, min_lr=cfg.min_lr)
    for step in range(cfg.steps):
        np.testing.assert_allclose(float(ours(step)), sched.get_last_lr()[0], rtol=1e-5, atol=1e-12, err_msg=str(step))
        opt.step()
        sched.step()


def test_adamw_with_clipping_matches_torch():
    import torch  # a pinned test dependency: missing is a broken install, not a skip

    rng = np.random.default_rng(0)
    params = {
        "language_model": {"w": rng.normal(size=(3, 4)).astype(np.float32)},
        "connector": {"b": rng.normal(size=(5,)).astype(np.float32)},
    }
    cfg = _train_cfg(lr=1e-2, warmup_steps=0, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, max_grad_norm=1.0)
    tx, _ = optim.make_optimizer(cfg, params)
    state = tx.init(params)
    tparams = [
        torch.nn.Parameter(torch.tensor(params["language_model"]["w"])),
        torch.nn.Parameter(torch.tensor(params["connector"]["b"])),
    ]
    topt = torch.optim.AdamW(
        tparams, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay
    )
    ours = jax.tree.map(jnp.asarray, params)
    for scale in (3.0, 0.1, 5.0):  # global norms above and below max_grad_norm
        grads = {
            "language_model": {"w": scale * rng.normal(size=(3, 4)).astype(np.float32)},
            "connector": {"b": scale * rng.normal(size=(5,)).astype(np.float32)},
        }
        updates, state = tx.update(grads, state, ours)
        ours = optax.apply_updates(ours, updates)
        tparams[0].grad, tparams[1].grad = (
            torch.tensor(grads["language_model"]["w"]),
            torch.tensor(grads["connector"]["b"]),
        )
        torch.nn.utils.clip_grad_norm_(tparams, cfg.max_grad_norm)
        topt.step()
        np.testing.assert_allclose(ours["language_model"]["w"], tparams[0].detach().numpy(), rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(ours["connector"]["b"], tparams[1].detach().numpy(), rtol=2e-5, atol=1e-6)


def _frozen_paths(params, freeze):
    labels = optim.param_labels(params, freeze)
    flat = jax.tree_util.tree_flatten_with_path(labels)[0]
    return {optim.param_path(p) for p, label in flat if label == optim.FROZEN}


def test_freeze_patterns_select_the_modules():
    params = jax.eval_shape(T.init_fn, jax.random.PRNGKey(0))  # boxed abstract params: paths are what matter
    params = dict(params, vae={"encoder": {"kernel": jnp.zeros(2)}})
    paths = {optim.param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params, is_leaf=optim._is_box)[0]}
    assert len(paths) == 20  # 19 toy params + the VAE stand-in
    assert _frozen_paths(params, ()) == {"vae/encoder/kernel"}  # the VAE is always frozen
    assert _frozen_paths(params, ("vit",)) - {"vae/encoder/kernel"} == {"vit_model/kernel", "vit_model/bias"}
    assert _frozen_paths(params, ("connector",)) - {"vae/encoder/kernel"} == {"connector/kernel"}
    llm = {p for p in paths if p.startswith("language_model/")}
    assert _frozen_paths(params, ("llm",)) - {"vae/encoder/kernel"} == llm
    gen = {p for p in llm if "_moe_gen" in p}
    assert gen and _frozen_paths(params, ("gen",)) - {"vae/encoder/kernel"} == gen
    und = _frozen_paths(params, ("und",)) - {"vae/encoder/kernel"}
    assert und == llm - gen - {"language_model/lm_head/kernel"}
    assert "language_model/embed_tokens" in und and "language_model/layer_0_und/q_proj/kernel" in und


@pytest.mark.parametrize(
    "freeze,msg", [(("decoder",), "unknown module 'decoder'"), (("vit",), "module 'vit' matches no parameter")]
)
def test_bad_freeze_is_config_error(freeze, msg):
    params = {"language_model": {"w": jnp.zeros(3)}}  # no vit_model in this tree
    with pytest.raises(ConfigError, match=rf"^train.freeze: {msg}"):
        optim.make_optimizer(_train_cfg(freeze=freeze), params)


def test_frozen_modules_do_not_move_and_hold_no_optimizer_state():
    run = T.toy_run(num_devices=1, data=1, train=(("freeze", ("vit", "gen")), ("warmup_steps", 0)))
    start = T.host_tree(run.init())
    state, _ = run.run(run.init(), T.ToyData(8), 3)
    end = T.host_tree(state)
    mask = jax.tree.leaves(run.trainable)
    paths = [optim.param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(end.params)[0]]
    for path, trains, a, b, ema in zip(
        paths, mask, jax.tree.leaves(start.params), jax.tree.leaves(end.params), jax.tree.leaves(end.ema_full_params())
    ):
        frozen = path.startswith("vit_model/") or "_moe_gen" in path
        assert trains == (not frozen), path
        if frozen:
            np.testing.assert_array_equal(a, b, err_msg=path)
            np.testing.assert_array_equal(ema, a, err_msg=path)
        else:
            assert not np.array_equal(a, b), path
    ema_paths = ["/".join(p) for p in param_subtree.paths(end.ema_params)]  # the EMA holds the trainable leaves only
    assert ema_paths and not any(p.startswith("vit_model/") or "_moe_gen" in p for p in ema_paths)
    adam = state.opt_state.inner_states["train"].inner_state[1][0]
    assert "vit_model" not in adam.mu or not jax.tree.leaves(adam.mu["vit_model"])


def _halt():
    c = T.toy_config()
    c.train.nonfinite = "halt"
    return c


def test_ema_and_nonfinite_step_skipped_and_counted(tmp_path):
    run = T.toy_run(data=8)
    data = T.ToyData(8)
    state, _ = run.run(run.init(), data, 2)
    before = T.host_tree(state)
    bad = next(data)
    bad["patches"][0, 0, 0] = np.nan
    state, metrics = run.step(state, shard_batch(bad, run.mesh, run.rules))
    after = T.host_tree(state)
    assert int(metrics["nonfinite"]) == 1 and int(metrics["nonfinite_steps"]) == 1
    assert not np.isfinite(float(metrics["grad_norm"]))
    assert int(after.step) == 3 and int(after.nonfinite_steps) == 1
    for name in ("params", "opt_state", "ema_params", "rng"):
        for a, b in zip(jax.tree.leaves(getattr(before, name)), jax.tree.leaves(getattr(after, name))):
            np.testing.assert_array_equal(a, b, err_msg=name)
    count = int(metrics["nonfinite_steps"])
    with pytest.raises(NonFiniteError, match="train.nonfinite=halt"):
        NonFiniteGuard(_halt(), str(tmp_path), step=2, count=0).update(3, count)
    assert not NonFiniteGuard(T.toy_config(), str(tmp_path), step=2, count=0).update(3, count)  # skip: counted

    # the next good step is applied with the lr of the 3rd update, and EMA follows its formula
    state, metrics = run.step(state, shard_batch(next(data), run.mesh, run.rules))
    good = T.host_tree(state)
    assert int(metrics["nonfinite"]) == 0 and int(good.nonfinite_steps) == 1 and int(good.step) == 4
    np.testing.assert_allclose(float(metrics["lr"]), float(run.schedule(2)), rtol=1e-7)
    decay = run.config.train.ema_decay
    for e0, p1, e1 in zip(
        jax.tree.leaves(after.ema_params), jax.tree.leaves(good.params), jax.tree.leaves(good.ema_params)
    ):
        np.testing.assert_allclose(e1, decay * e0 + (1 - decay) * p1, rtol=1e-6, atol=1e-7)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after.params), jax.tree.leaves(good.params)))


def test_gradient_accumulation_equals_full_batch():
    # equal loss counts per microbatch (deterministic loss): the averaged gradient is the full-batch gradient
    full = T.toy_run(num_devices=1, data=1, loss=T.deterministic_loss_fn)
    accum = T.toy_run(loss=T.deterministic_loss_fn, train=(("grad_accum_steps", 2),), data=2, fsdp=2, tensor=2)
    s_full, h_full = full.run(full.init(), T.ToyData(8), 3)
    s_acc, h_acc = accum.run(accum.init(), T.ToyData(8), 3)
    np.testing.assert_allclose([h["loss"] for h in h_acc], [h["loss"] for h in h_full], rtol=1e-5)
    np.testing.assert_allclose([h["ce_count"] for h in h_acc], [h["ce_count"] for h in h_full])
    np.testing.assert_allclose([h["ce"] for h in h_acc], [h["ce"] for h in h_full], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(T.host_tree(s_acc.params)), jax.tree.leaves(T.host_tree(s_full.params))):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_accumulation_with_loss_counts_equals_full_batch_for_unequal_counts():
    """Rows with different label counts: with the global counts the accumulated step equals the full batch (the
    trainer's wiring on a data 2 × fsdp 2 × tensor 2 mesh); averaging microbatch means does not."""
    from bagel_jax.parallel.mesh import shard_batch

    batch = T.make_batch(8, seed=3)
    batch["weight"][np.arange(8), np.arange(8) + 2] = 0.0
    batch["weight"][::3, 4:] = 0.0  # rows 0, 3, 6 hold 4 labels, the others 12-13
    full = T.toy_run(num_devices=1, data=1, loss=T.deterministic_loss_fn)  # the runs of the test above, and
    kw = dict(train=(("grad_accum_steps", 2),), data=2, fsdp=2, tensor=2)
    biased = T.toy_run(loss=T.deterministic_loss_fn, **kw)
    exact = T.toy_run(loss=T.counted_loss_fn, loss_counts=T.ce_counts, **kw)
    out = {}
    for name, run in (("full", full), ("exact", exact), ("biased", biased)):
        state, metrics = run.step(run.init(), shard_batch(batch, run.mesh, run.rules))
        out[name] = (float(metrics["loss"]), T.host_tree(state.params))
    assert abs(out["biased"][0] - out["full"][0]) > 1e-3 * abs(out["full"][0])
    np.testing.assert_allclose(out["exact"][0], out["full"][0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(out["exact"][1]), jax.tree.leaves(out["full"][1]), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_accumulation_not_dividing_batch_is_config_error():
    with pytest.raises(ConfigError, match=r"^train.grad_accum_steps: 3 microbatches × 8 batch shards"):
        T.toy_run(train=(("grad_accum_steps", 3),), data=8)


def test_per_module_lr_matches_torch_param_groups():
    """train.lr_scale: und ×0.1, llm ×0.5 (a leaf in both gets ×0.05) = torch AdamW param groups with those lrs
    (weight decay scaled with them), one clip over all params; frozen leaves still get nothing."""
    import torch  # a pinned test dependency: missing is a broken install, not a skip

    rng = np.random.default_rng(1)
    shapes = {
        "language_model/q_proj": (3, 4),
        "language_model/q_proj_moe_gen": (3, 4),
        "connector/w": (5,),
        "vit_model/w": (2,),
    }
    params = {
        "language_model": {
            "q_proj": rng.normal(size=(3, 4)).astype(np.float32),
            "q_proj_moe_gen": rng.normal(size=(3, 4)).astype(np.float32),
        },
        "connector": {"w": rng.normal(size=(5,)).astype(np.float32)},
        "vit_model": {"w": rng.normal(size=(2,)).astype(np.float32)},
    }
    cfg = _train_cfg(lr=1e-2, warmup_steps=0, weight_decay=0.1, max_grad_norm=1.0, freeze=("vit",))
    cfg.lr_scale.update(und=0.1, llm=0.5)
    tx, _ = optim.make_optimizer(cfg, params)
    state = tx.init(params)
    lrs = {"language_model/q_proj": 0.05 * cfg.lr, "language_model/q_proj_moe_gen": 0.5 * cfg.lr, "connector/w": cfg.lr}
    tparams = {k: torch.nn.Parameter(torch.tensor(params[k.split("/")[0]][k.split("/")[1]])) for k in lrs}
    topt = torch.optim.AdamW(
        [dict(params=[tparams[k]], lr=lr) for k, lr in lrs.items()],
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
    )
    ours = jax.tree.map(jnp.asarray, params)
    for scale in (3.0, 0.1, 5.0):
        grads = {k: scale * rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
        tree = {
            "language_model": {
                "q_proj": grads["language_model/q_proj"],
                "q_proj_moe_gen": grads["language_model/q_proj_moe_gen"],
            },
            "connector": {"w": grads["connector/w"]},
            "vit_model": {"w": grads["vit_model/w"]},
        }
        updates, state = tx.update(tree, state, ours)
        ours = optax.apply_updates(ours, updates)
        for k in lrs:
            tparams[k].grad = torch.tensor(grads[k])
        torch.nn.utils.clip_grad_norm_(list(tparams.values()), cfg.max_grad_norm)
        topt.step()
        for k in lrs:
            a, b = k.split("/")
            np.testing.assert_allclose(ours[a][b], tparams[k].detach().numpy(), rtol=2e-5, atol=1e-6, err_msg=k)
    np.testing.assert_array_equal(ours["vit_model"]["w"], params["vit_model"]["w"])


def test_lr_scale_all_ones_keeps_the_optimizer_state_structure():
    """Factors of 1 add nothing, so checkpoints of runs without lr_scale restore as before."""
    params = {"language_model": {"w": np.zeros((2, 2), np.float32)}}
    plain = optim.make_optimizer(_train_cfg(), params)[0].init(params)
    cfg = _train_cfg()
    cfg.lr_scale.update(und=0.5)
    scaled = optim.make_optimizer(cfg, params)[0].init(params)
    assert jax.tree.structure(scaled) != jax.tree.structure(plain)  # the factor transform is only there when used
    assert optim.lr_factors(_train_cfg()) == {}


@pytest.mark.parametrize("name,value", [("und", 0.0), ("gen", -1.0)])
def test_bad_lr_scale_is_one_line(name, value):
    from bagel_jax.config import validate

    config = T.toy_config()
    config.train.lr_scale[name] = value
    with pytest.raises(ConfigError, match=rf"^train\.lr_scale\.{name}: must be > 0"):
        validate(config)
    with pytest.raises(ConfigError, match=rf"^train\.lr_scale\.{name}: must be > 0"):
        optim.make_optimizer(config.train, {"language_model": {"w": np.zeros(2, np.float32)}})


@pytest.mark.parametrize("k", [1, 2])
def test_grads_only_for_trainable_leaves(k):
    """The step differentiates w.r.t. trainable leaves only: their grads equal jax.grad's (averaged over k
    microbatches); frozen leaves get zeros."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from bagel_jax.parallel.mesh import logical_rules
    from bagel_jax.train.step import _accumulated_grads

    rng = np.random.default_rng(0)
    params = {
        "frozen": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
        "train": jnp.asarray(rng.normal(size=(2,)), jnp.float32),
    }
    batch = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)

    def loss_fn(p, x, key):
        del key
        y = x @ p["frozen"] @ p["train"]
        return jnp.mean(y**2), {}

    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1, 1), ("data", "fsdp", "tensor", "sequence"))
    shardings = jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), params)
    mask = [False, True]  # jax.tree.leaves order: frozen, train
    with mesh:
        _, _, grads = _accumulated_grads(
            loss_fn, params, batch, jax.random.PRNGKey(0), k, mesh, logical_rules(T.toy_config()), shardings, mask
        )
    want = jax.grad(lambda p: loss_fn(p, batch, None)[0])(params)
    np.testing.assert_allclose(grads["train"], want["train"], rtol=1e-5)
    np.testing.assert_array_equal(grads["frozen"], np.zeros((3, 2), np.float32))
