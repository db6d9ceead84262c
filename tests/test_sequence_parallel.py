"""Sequence parallelism through the whole BAGEL model: a train step's loss and gradients on a
(data 1, fsdp 2, tensor 2, sequence 2) mesh of 8 simulated CPU devices equal one device's (f32).

The batch is two packed rows of the four sample kinds (T2I, VLM, editing, interleaved: text, ViT tokens, clean and
noised VAE latents), the loss is the trainer's (``make_loss_fn``: label-slot CE + flow MSE), gradients are w.r.t.
every trainable param. Besides equality, the compiled step must not all-gather a whole row of hidden states outside
the attention kernel (whose K/V all-gather along the sequence is the one gather sequence parallelism needs).
"""

import re

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding

from bagel_jax.model.bagel import make_init_fn
from bagel_jax.parallel.mesh import batch_spec, logical_rules, logical_shardings, make_mesh, use_mesh
from bagel_jax.train.losses import make_loss_fn
from bagel_testlib import budgets, documents, four_samples, layout, packed_batch, tiny_config

SEQ_LEN, UND_LEN = 256, 192


def _loss_and_grads(config, boxed, batch, devices, **parallel):
    config.parallel.update({**dict(data=1, fsdp=1, tensor=1, sequence=1), **parallel})
    mesh, rules = make_mesh(config, devices), logical_rules(config)
    model, _ = make_init_fn(config)
    loss_fn = make_loss_fn(model, config)
    rng = jax.random.key(1)

    def fn(params, batch):
        return jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng)

    shardings = (
        logical_shardings(boxed, mesh, rules),
        jax.tree.map(lambda _: NamedSharding(mesh, batch_spec(rules)), batch),
    )
    params = nn.meta.unbox(boxed)  # outside the mesh context (unboxing there would apply the constraints)
    with use_mesh(mesh, rules):
        compiled = jax.jit(fn, in_shardings=shardings).lower(params, batch).compile()
        out = compiled(params, batch)
    return jax.device_get(out), compiled.as_text()


@pytest.mark.slow
def test_sequence_2_equals_one_device():
    config = tiny_config()
    config.data.max_labels_per_row = 32  # the 7B configs' label-slot CE (a gather of und rows)
    cfg = config.model
    docs = documents(four_samples(), layout(cfg))
    batch = packed_batch([docs[:2], docs[2:]], budgets(seq_len=SEQ_LEN, und_len=UND_LEN))
    _, init_fn = make_init_fn(config)
    boxed = jax.jit(init_fn)(jax.random.key(0))

    ((loss1, aux1), grads1), _ = _loss_and_grads(config, boxed, batch, jax.devices()[:1])
    ((loss2, aux2), grads2), hlo = _loss_and_grads(config, boxed, batch, jax.devices(), fsdp=2, tensor=2, sequence=2)

    np.testing.assert_allclose(loss2, loss1, rtol=2e-5)
    for key in aux1:
        np.testing.assert_allclose(aux2[key], aux1[key], rtol=2e-5, err_msg=key)
    assert aux1["mse_count"] > 0 and aux1["ce_count"] > 0
    # rtol 2e-5 per element; atol for entries whose true gradient is 0 (e.g. the k_proj biases: softmax is
    # invariant to them) and that carry only f32 summation noise, ~1e-7 of the largest gradient
    scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(grads1))
    for (path, g1), g2 in zip(jax.tree_util.tree_leaves_with_path(grads1), jax.tree.leaves(grads2), strict=True):
        np.testing.assert_allclose(g2, g1, rtol=2e-5, atol=1e-6 * scale, err_msg=jax.tree_util.keystr(path))

    # no all-gather of a whole row of hidden states in the decoder, the CE or the velocity head (the K/V the attention
    # kernel gathers are [rows, L, kv heads, head_dim]); the embedding lookups are left to XLA (DESIGN_NOTES 45)
    width = cfg.hidden_size
    row = re.compile(rf"= f32\[\d+,({UND_LEN}|{SEQ_LEN}),{width}\]\S* all-gather")
    gathered = [line for line in hlo.splitlines() if row.search(line) and "embed_tokens" not in line]
    assert not gathered, "\n".join(gathered)
