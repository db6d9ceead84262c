"""``train/hlo_flops.loop_scaled_flops`` on lowered (global) HLO: a ``shard_map`` body counts once per chip."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bagel_jax.train.hlo_flops import loop_scaled_flops

ROWS, WIDTH, TRIPS = 128, 64, 3


def _lowered(axes: dict[str, int], manual: tuple[str, ...]):
    """tanh(h @ w) three times (a loop) on each chip's rows inside a shard_map over ``manual``, then one global
    matmul outside it; the mesh ``axes`` (8 CPU devices)."""
    mesh = jax.make_mesh(tuple(axes.values()), tuple(axes), axis_types=(jax.sharding.AxisType.Auto,) * len(axes))
    rows = P(manual if len(manual) > 1 else manual[0])

    def body(w, x):
        return jax.lax.fori_loop(0, TRIPS, lambda i, h: jnp.tanh(h @ w), x)

    def step(w, x):
        y = jax.shard_map(body, mesh=mesh, in_specs=(P(), rows), out_specs=rows, check_vma=False)(w, x)
        return (y @ w).sum()

    shapes = (jax.ShapeDtypeStruct((WIDTH, WIDTH), jnp.float32), jax.ShapeDtypeStruct((ROWS, WIDTH), jnp.float32))
    with jax.set_mesh(mesh):
        fn = jax.jit(step, in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, rows)))
        return fn.lower(*shapes).as_text(dialect="hlo")


@pytest.mark.parametrize(
    "axes, manual", [(dict(x=4, y=2), ("x",)), (dict(x=4, y=2), ("x", "y")), (dict(x=8), ("x",))], ids=str
)
def test_a_shard_map_body_counts_once_per_chip(axes, manual):
    got = loop_scaled_flops(_lowered(axes, manual))
    matmuls = 2 * ROWS * WIDTH * WIDTH * (TRIPS + 1)  # every row through the loop's matmuls, then the global one
    assert matmuls <= got.flops <= 1.01 * matmuls, (got, matmuls)
    assert got.raw < 0.6 * matmuls and not got.unknown  # XLA alone: one chip's body, the loop once
