"""A small real Flax model + loss for the training-infrastructure tests (mesh, optim, checkpoint, aot).

Its param tree mimics BAGEL's top level (``vit_model``, ``connector``, ``language_model`` with und and
``*_moe_gen`` experts, ``embed_tokens``, ``lm_head``) so freezing patterns and sharding rules are exercised on
the names they will see. Every parameter carries logical axis names; the activations are constrained.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bagel_jax.config import base_config

VOCAB, EMBED, MLP, HEADS, HEAD_DIM, PATCH = 64, 32, 64, 4, 8, 12


def _dense(features, names, name, use_bias=False):
    return nn.Dense(
        features,
        use_bias=use_bias,
        name=name,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.2), names),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[-1:]),
    )


class Expert(nn.Module):
    """Attention projections + SwiGLU of one expert (suffix '' = und, '_moe_gen' = gen)."""

    suffix: str

    @nn.compact
    def __call__(self, x, attend):
        s = self.suffix
        q = _dense(HEADS * HEAD_DIM, ("embed", "heads"), f"q_proj{s}", use_bias=True)(x)
        o = attend(q)
        x = x + _dense(EMBED, ("heads", "embed"), f"o_proj{s}")(o)
        gate = _dense(MLP, ("embed", "mlp"), f"gate_proj{s}")(x)
        up = _dense(MLP, ("embed", "mlp"), f"up_proj{s}")(x)
        return x + _dense(EMBED, ("mlp", "embed"), f"down_proj{s}")(nn.silu(gate) * up)


class ToyLM(nn.Module):
    """tokens int32[B, L], patches f32[B, L, PATCH] -> logits f32[B, L, VOCAB].

    First half of each row goes to the und expert, second half to the gen expert (static slices, like MoT).
    """

    @nn.compact
    def __call__(self, tokens, patches):
        vit = _dense(EMBED, ("patch", "vit_embed"), "vit_model", use_bias=True)
        connector = _dense(EMBED, ("vit_embed", "embed"), "connector")
        lm = LanguageModel(name="language_model")
        return lm(tokens, connector(nn.gelu(vit(patches))))


class LanguageModel(nn.Module):
    @nn.compact
    def __call__(self, tokens, vision):
        emb = self.param(
            "embed_tokens",
            nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
            (VOCAB, EMBED),
        )
        x = jnp.take(emb, tokens, axis=0) + vision
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
        k = _dense(HEADS * HEAD_DIM, ("embed", "heads"), "k_proj")(x)
        v = _dense(HEADS * HEAD_DIM, ("embed", "heads"), "v_proj")(x)
        B, L, _ = x.shape
        causal = jnp.tril(jnp.ones((L, L), bool))

        def attend(q, rows):
            qh = q.reshape(q.shape[:2] + (HEADS, HEAD_DIM))
            kh, vh = (t.reshape(B, L, HEADS, HEAD_DIM) for t in (k, v))
            logits = jnp.einsum("bqhd,bkhd->bhqk", qh, kh) / np.sqrt(HEAD_DIM)
            logits = jnp.where(causal[rows][None, None], logits, -1e30)
            out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), vh)
            return out.reshape(q.shape)

        half = L // 2
        und = Expert("", name="layer_0_und")(x[:, :half], lambda q: attend(q, slice(0, half)))
        gen = Expert("_moe_gen", name="layer_0_gen")(x[:, half:], lambda q: attend(q, slice(half, L)))
        x = jnp.concatenate([und, gen], axis=1)
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
        logits = _dense(VOCAB, ("embed", "vocab"), "lm_head")(x)
        return nn.with_logical_constraint(logits, ("activation_batch", "activation_length", "activation_vocab"))


def make_batch(rows: int, length: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """Host batch: tokens, patches, next-token targets and loss weights (last position weight 0)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, VOCAB, (rows, length), dtype=np.int32)
    weight = np.ones((rows, length), np.float32)
    weight[:, -1] = 0.0
    return dict(
        tokens=tokens,
        patches=rng.normal(size=(rows, length, PATCH)).astype(np.float32),
        targets=np.roll(tokens, -1, axis=1),
        weight=weight,
    )


MODEL = ToyLM()


def init_fn(rng):
    """rng -> boxed params (nn.LogicallyPartitioned leaves)."""
    b = make_batch(1)
    return MODEL.init(rng, jnp.asarray(b["tokens"]), jnp.asarray(b["patches"]))["params"]


def _ce(params, batch, weight):
    logits = MODEL.apply({"params": params}, batch["tokens"], batch["patches"])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    ce_sum, ce_count = jnp.sum(nll * weight), jnp.sum(weight)
    return ce_sum / ce_count, dict(ce_sum=ce_sum, ce_count=ce_count)


def loss_fn(params, batch, rng):
    """Weighted next-token CE (token mean); ``rng`` drops 25% of the loss positions (so resume must restore it)."""
    keep = jax.random.bernoulli(rng, 0.75, batch["weight"].shape)
    return _ce(params, batch, batch["weight"] * keep)


def counted_loss_fn(params, batch, rng, counts=None):
    """The deterministic CE divided by ``counts['ce']`` (a whole accumulated batch's label count) when given."""
    del rng
    loss, aux = _ce(params, batch, batch["weight"])
    return (loss if counts is None else aux["ce_sum"] / counts["ce"]), aux


def ce_counts(batch):
    """``loss_counts`` of the toy CE: the batch's label weight."""
    return {"ce": jnp.sum(batch["weight"])}


def deterministic_loss_fn(params, batch, rng):
    """Same CE without the random drop (equal counts per microbatch: accumulation is exact)."""
    del rng
    return _ce(params, batch, batch["weight"])


def toy_config(**parallel) -> ml_collections.ConfigDict:
    c = base_config()
    c.model.update(num_kv_heads=4, num_heads=4, hidden_size=EMBED)
    c.data.update(batch_size=8)
    c.train.update(steps=10, lr=1e-2, warmup_steps=2, ema_decay=0.9, max_grad_norm=1.0, beta2=0.95, eps=1e-8)
    c.parallel.update(data=-1, fsdp=1, tensor=1, sequence=1)
    c.parallel.update(**parallel)
    return c


def aot_spec(config):
    """``python -m bagel_jax.aot --loss=train_toy:aot_spec``: the toy model for the AOT planner."""
    from bagel_jax.aot import ModelSpec

    host = make_batch(config.data.batch_size)
    return ModelSpec(init_fn, loss_fn, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), host))


class ToyData:
    """A checkpointable batch stream: batch i = ``make_batch(rows, seed=i)``; state = index of the next batch."""

    def __init__(self, rows: int):
        self.rows, self.next_index = rows, 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = make_batch(self.rows, seed=self.next_index)
        self.next_index += 1
        return batch

    def get_state(self):
        return {"next_index": self.next_index}

    def set_state(self, state):
        self.next_index = int(state["next_index"])


class ToyRun:
    """Mesh, optimizer, shardings, jitted init and step for the toy model under ``config`` (the trainer's wiring).

    Use ``toy_run(...)`` to share compiled runs between tests (XLA:CPU compiles for 8 devices are slow).
    """

    def __init__(self, config, devices=None, loss=None, loss_counts=None):
        from bagel_jax.parallel.mesh import logical_rules, make_mesh
        from bagel_jax.train.optim import make_optimizer, trainable_mask
        from bagel_jax.train.state import make_init, state_shardings
        from bagel_jax.train.step import make_train_step

        self.config = config
        self.mesh = make_mesh(config, devices)
        self.rules = logical_rules(config)
        self.params_shape = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
        self.tx, self.schedule = make_optimizer(config.train, self.params_shape)
        self.freeze = tuple(config.train.freeze)
        self.shardings = state_shardings(init_fn, self.tx, self.mesh, self.rules, self.freeze)
        self.trainable = trainable_mask(self.params_shape, tuple(config.train.freeze))
        self.step = make_train_step(
            loss or loss_fn,
            self.tx,
            self.schedule,
            config,
            mesh=self.mesh,
            rules=self.rules,
            state_shardings=self.shardings,
            trainable=self.trainable,
            loss_counts=loss_counts,
        )
        self._init = make_init(init_fn, self.tx, self.shardings, self.freeze)

    def init(self, seed: int = 1):
        return self._init(jax.random.PRNGKey(seed))

    def abstract(self):
        from bagel_jax.train.state import abstract_state

        return abstract_state(init_fn, self.tx, self.mesh, self.rules, self.freeze)

    def run(self, state, data, steps: int):
        """``steps`` train steps on batches from ``data``; returns (state, [host metrics dicts])."""
        from bagel_jax.parallel.mesh import shard_batch

        history = []
        for _ in range(steps):
            state, metrics = self.step(state, shard_batch(next(data), self.mesh, self.rules))
            history.append(jax.device_get(metrics))
        return state, history


_RUNS: dict = {}


def toy_run(num_devices: int = 8, loss=None, train=(), loss_counts=None, **parallel) -> ToyRun:
    """Cached ``ToyRun`` on the first ``num_devices`` devices; ``train``: ((key, value), ...) overrides."""
    key = (num_devices, loss, tuple(train), loss_counts, tuple(sorted(parallel.items())))
    if key not in _RUNS:
        config = toy_config(**parallel)
        config.train.update(dict(train))
        _RUNS[key] = ToyRun(config, devices=jax.devices()[:num_devices], loss=loss, loss_counts=loss_counts)
    return _RUNS[key]


def host_tree(tree):
    """Every leaf as a numpy array (gathers sharded arrays)."""
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def digest(tree) -> str:
    """sha256 over every leaf's bytes (bitwise identity of two states across processes)."""
    import hashlib

    h = hashlib.sha256()
    for leaf in jax.tree.leaves(host_tree(tree)):
        h.update(np.ascontiguousarray(leaf).tobytes())
    return h.hexdigest()
