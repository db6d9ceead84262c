"""Mesh from config, batch sharding, and sharded training == single-device training (8 simulated CPUs)."""

import jax
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import train_toy as T
from bagel_jax.config import ConfigError
from bagel_jax.parallel import mesh as mesh_lib

STEPS = 3
# f32 on CPU at highest matmul precision: sharded reductions change summation order only.
LOSS_RTOL, PARAM_ATOL = 1e-5, 1e-5


@pytest.mark.parametrize(
    "parallel,shape",
    [
        (dict(data=8), (8, 1, 1, 1)),
        (dict(data=1, fsdp=8), (1, 8, 1, 1)),
        (dict(data=2, fsdp=2, tensor=2), (2, 2, 2, 1)),
        (dict(data=-1, fsdp=2, tensor=2), (2, 2, 2, 1)),
        (dict(data=1, fsdp=-1, sequence=2), (1, 4, 1, 2)),
    ],
)
def test_mesh_shape_and_axis_types(parallel, shape):
    mesh = mesh_lib.make_mesh(T.toy_config(**parallel))
    assert tuple(mesh.shape.values()) == shape
    assert mesh.axis_names == ("data", "fsdp", "tensor", "sequence")
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


@pytest.mark.parametrize(
    "parallel,batch,key",
    [
        (dict(data=3), 8, "parallel"),  # 3 does not divide 8 devices
        (dict(data=2, fsdp=2), 8, "parallel"),  # 4 != 8 devices
        (dict(data=-1, fsdp=-1), 8, "parallel"),  # two fills
        (dict(data=4, fsdp=2), 4, "data.batch_size"),  # 4 rows over 8 batch shards
        (dict(data=8, dcn_data=3), 8, "parallel.dcn_data"),  # does not divide data
        (dict(data=8, dcn_data=2), 8, "parallel.dcn_data"),  # CPU devices form one slice
    ],
)
def test_bad_mesh_config_is_one_line_error_naming_the_key(parallel, batch, key):
    config = T.toy_config(**parallel)
    config.data.batch_size = batch
    with pytest.raises(ConfigError) as err:
        mesh_lib.make_mesh(config)
    msg = str(err.value)
    assert msg.startswith(key + ":") and "\n" not in msg, msg


def test_unknown_rules_override_is_config_error():
    config = T.toy_config()
    config.parallel.rules_override = {"no_such_axis": "fsdp"}
    with pytest.raises(ConfigError, match=r"^parallel.rules_override: .*no_such_axis"):
        mesh_lib.logical_rules(config)


def test_shard_batch_builds_global_arrays_split_over_batch_axes():
    config = T.toy_config(data=2, fsdp=2, tensor=2)
    mesh, rules = mesh_lib.make_mesh(config), mesh_lib.logical_rules(config)
    host = T.make_batch(8)
    batch = mesh_lib.shard_batch(host, mesh, rules)
    for name, x in batch.items():
        assert x.shape == host[name].shape
        assert x.sharding.spec == P(("data", "fsdp"))
        np.testing.assert_array_equal(np.asarray(x), host[name])
        # 4 batch shards, replicated over tensor: every device holds 2 rows
        assert {s.data.shape[0] for s in x.addressable_shards} == {2}
    assert mesh_lib.batch_shards(mesh, rules) == 4
    abstract = mesh_lib.abstract_batch(host, mesh, rules)
    assert abstract["tokens"].shape == (8, 16) and abstract["tokens"].sharding.spec == P(("data", "fsdp"))


@pytest.fixture(scope="module")
def single_device_run():
    run = T.toy_run(num_devices=1, data=1)
    state, history = run.run(run.init(), T.ToyData(8), STEPS)
    return T.host_tree(state), [h["loss"] for h in history]


@pytest.mark.parametrize(
    "parallel", [dict(data=8), dict(data=1, fsdp=8), dict(data=2, fsdp=2, tensor=2)], ids=["data8", "fsdp8", "d2f2t2"]
)
def test_sharded_training_matches_one_device(parallel, single_device_run):
    ref_state, ref_losses = single_device_run
    run = T.toy_run(**parallel)
    state, history = run.run(run.init(), T.ToyData(8), STEPS)
    np.testing.assert_allclose([h["loss"] for h in history], ref_losses, rtol=LOSS_RTOL)
    for got, want in zip(jax.tree.leaves(T.host_tree(state)), jax.tree.leaves(ref_state)):
        np.testing.assert_allclose(got, want, atol=PARAM_ATOL, rtol=1e-5)
    assert int(state.step) == STEPS

    # params, optimizer moments and EMA are sharded as the rules say (embed→fsdp, mlp/heads/vocab→tensor)
    sizes = dict(run.mesh.shape)
    expected = {
        ("language_model", "embed_tokens"): (P("tensor", "fsdp"), (64 // sizes["tensor"], 32 // sizes["fsdp"])),
        ("language_model", "layer_0_und", "gate_proj", "kernel"): (
            P("fsdp", "tensor"),
            (32 // sizes["fsdp"], 64 // sizes["tensor"]),
        ),
        ("language_model", "layer_0_gen", "down_proj_moe_gen", "kernel"): (
            P("tensor", "fsdp"),
            (64 // sizes["tensor"], 32 // sizes["fsdp"]),
        ),
        ("connector", "kernel"): (P(None, "fsdp"), (32, 32 // sizes["fsdp"])),
    }
    adam = state.opt_state.inner_states["train"].inner_state[1][0]
    for path, (spec, shard_shape) in expected.items():
        for tree in (state.params, state.ema_params, adam.mu, adam.nu):
            leaf = tree
            for key in path:
                leaf = leaf[key]
            assert leaf.sharding.spec == spec, (path, leaf.sharding.spec)
            assert {s.data.shape for s in leaf.addressable_shards} == {shard_shape}, path
