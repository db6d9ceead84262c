"""The Pallas split-wise attention kernel compiles for real TPUs (v5e, v5p, v6e) at 32K tokens.

Interpret mode does not check Mosaic's lowering rules (block shapes, layouts, SMEM/VMEM limits), so
this AOT-compiles forward and forward+backward (vjp: fwd, dq and dkv kernels) against compile-only TPU
devices from ``jax.experimental.topologies`` on this CPU host (needs libtpu, the ``[tpu]`` extra) and
reads the compiled memory use: it must fit the chip's HBM and stay linear in L (no L×L temp).

Each compile runs in a subprocess (``python tests/test_tpu_aot.py TOPOLOGY L HQ HKV [HEAD_DIM PAD]``) so the
test session's CPU backend is untouched. Shapes: BAGEL-7B's 28 q / 4 kv heads split 4-way by tensor
parallelism (7 q / 1 kv head per chip), head_dim 128, bf16, one 32K row, 512×512 blocks; and SigLIP's
16 × 72 heads at 4K, head groups against the padded layout.
Default run: v5e (~20–40 s on 2 cores, + ~70 s for head_dim 72); v5p, v6e, 16K, 8 × 72 and the unsplit
28/4 heads: ``-m slow``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

GIB = 2**30
# (accelerator type for libtpu's env, HBM per chip)
CHIPS = {"v5e:2x2": ("v5litepod-4", 16 * GIB), "v5p:2x2x1": ("v5p-8", 95 * GIB), "v6e:2x2": ("v6e-4", 32 * GIB)}


def _compile_in_subprocess(topology: str, seq_len: int, hq: int, hkv: int, head_dim: int = 128, pad: bool = False):
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        TPU_SKIP_MDS_QUERY="1",
        TPU_WORKER_HOSTNAMES="localhost",
        TPU_ACCELERATOR_TYPE=CHIPS[topology][0],
        JAX_ENABLE_COMPILATION_CACHE="false",  # compile-only TPU executables cannot be read back from it
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), topology, *map(str, (seq_len, hq, hkv, head_dim, int(pad)))],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=root,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        raise AssertionError(f"AOT compile for {topology} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(lines[-1])


def _check(topology: str, seq_len: int = 32768, hq: int = 7, hkv: int = 1, lxl_fraction: float = 1 / 16):
    """Compiles, prints memory, asserts: fits HBM, temp ≤ 2× the L-linear activations and < lxl_fraction·L²·4."""
    start = time.time()
    res = _compile_in_subprocess(topology, seq_len, hq, hkv)
    hbm = CHIPS[topology][1]
    print(
        f"\n{res['device_kind']} L={seq_len} heads {hq}/{hkv}: "
        + "; ".join(
            f"{name}: compile {r['compile_s']:.1f}s, args {r['arg'] / 2**20:.0f} MiB, out {r['out'] / 2**20:.0f} MiB, "
            f"temp {r['temp'] / 2**20:.1f} MiB, kernels {r['kernels']}"
            for name, r in res["programs"].items()
        )
        + f" (total {time.time() - start:.0f}s)"
    )
    bf16 = 2
    activations = seq_len * 128 * bf16 * (3 * hq + 2 * hkv)  # q, o, do + k, v
    for name, r in res["programs"].items():
        assert r["arg"] + r["out"] + r["temp"] < hbm, f"{name} does not fit {topology} HBM"
        assert r["temp"] < seq_len * seq_len * 4 * lxl_fraction, f"{name}: temp {r['temp']} is L×L-sized"
        assert r["temp"] <= 2 * activations, f"{name}: temp {r['temp']} exceeds the linear bound {2 * activations}"
    assert res["programs"]["fwd"]["kernels"] == 1
    assert res["programs"]["fwd+bwd"]["kernels"] == 3  # forward, dq, dkv
    return res


@pytest.mark.tpu
def test_aot_compile_v5e_32k():
    _check("v5e:2x2")


@pytest.mark.tpu
@pytest.mark.slow
@pytest.mark.parametrize("topology", ["v5p:2x2x1", "v6e:2x2"])
def test_aot_compile_v5p_v6e_32k(topology):
    _check(topology)


@pytest.mark.tpu
@pytest.mark.slow
def test_aot_compile_v5e_all_heads_on_one_chip_memory_is_linear_in_length():
    """28 q / 4 kv heads unsplit: activations are themselves ~L²-scale here, so check the scaling:
    doubling L from 32K to 64K at most doubles the temp memory (+10 %; an L×L buffer would quadruple it).
    (Below 32K XLA fuses the input relayouts differently, so 16K → 32K is not a clean doubling.)"""
    small = _check("v5e:2x2", seq_len=32768, hq=28, hkv=4, lxl_fraction=1)
    large = _check("v5e:2x2", seq_len=65536, hq=28, hkv=4, lxl_fraction=1)
    for name in ("fwd", "fwd+bwd"):
        assert large["programs"][name]["temp"] <= 2.2 * small["programs"][name]["temp"], name


def _head_dim_72(topology: str, seq_len: int, heads: int = 16) -> dict:
    """SigLIP so400m's attention (16 heads × 72, MHA, one row, bf16; 8 heads = split over a tensor pair) compiled
    with head groups and padded (``pad_head_dim``). XLA's cost analysis does not see inside the Pallas kernels
    (whose tiles are 72/128 of the padded ones by construction): its bytes are the ops around them, the pad and
    slice copies of q/k/v/o/do and the relayouts; the head-group programs must move at most 0.6× the padded ones'
    and hold no more temporaries (+ 2 MiB of small buffers)."""
    res = {pad: _compile_in_subprocess(topology, seq_len, heads, heads, 72, pad) for pad in (False, True)}
    for name in ("fwd", "fwd+bwd"):
        grouped, padded = res[False]["programs"][name], res[True]["programs"][name]
        print(
            f"\n{res[False]['device_kind']} L={seq_len} {heads} x 72 {name}: "
            + "; ".join(
                f"{label}: flops {r['flops']:.3g}, bytes {r['bytes'] / 2**20:.0f} MiB, "
                f"temp {r['temp'] / 2**20:.1f} MiB, compile {r['compile_s']:.1f}s"
                for label, r in (("head groups", grouped), ("padded", padded))
            )
        )
    for name in ("fwd", "fwd+bwd"):
        grouped, padded = res[False]["programs"][name], res[True]["programs"][name]
        assert grouped["kernels"] == padded["kernels"] == (1 if name == "fwd" else 3)
        assert grouped["bytes"] <= 0.6 * padded["bytes"], (name, grouped["bytes"], padded["bytes"])
        assert grouped["temp"] <= padded["temp"] + 2 * 2**20, (name, grouped["temp"], padded["temp"])
    return res


@pytest.mark.tpu
def test_aot_head_dim_72_head_groups_do_not_pay_for_128_v5e():
    """head_dim 72 compiles for v5e without padding to 128 lanes (``_head_dim_72``). ~70 s on one core: Mosaic
    compiles the 16 unrolled heads of each kernel (the padded kernels: ~4 s)."""
    _head_dim_72("v5e:2x2", 4096)


@pytest.mark.tpu
@pytest.mark.slow
@pytest.mark.parametrize(
    "topology, seq_len, heads",
    [("v6e:2x2", 16384, 16), ("v6e:2x2", 4096, 8)],
)
def test_aot_head_dim_72_head_groups_v6e_16k_and_tensor_pair(topology, seq_len, heads):
    """The other generation at a long row (v5e at 4K is the default suite's), and the 8 heads of a tensor pair,
    which no c·72 of whole vregs divides: the tile takes all heads at full width."""
    _head_dim_72(topology, seq_len, heads)


def _main(topology: str, seq_len: int, hq: int, hkv: int, head_dim: int = 128, pad_head_dim: bool = False):
    """Subprocess body: AOT-compile fwd and fwd+bwd for one compile-only TPU device; print a JSON line."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from bagel_jax.attention import MaskMeta
    from bagel_jax.attention.tpu_split_splash import split_splash_attention

    dev = topologies.get_topology_desc(topology, "tpu").devices[0]
    mesh = Mesh(np.array([dev]), ("x",))

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P()))

    def fwd(q, k, v, *meta):
        if head_dim != 128:  # [B, L, H·hd] as a projection gives it: a [.., H, 72] argument would be laid out
            q, k, v = (x.reshape(*x.shape[:2], -1, head_dim) for x in (q, k, v))  # in 128-lane tiles
        out = split_splash_attention(q, k, v, MaskMeta(*meta), block_q=512, block_kv=512, pad_head_dim=pad_head_dim)
        return out.reshape(*out.shape[:2], -1) if head_dim != 128 else out

    def fwd_bwd(q, k, v, do, *meta):
        out, vjp = jax.vjp(lambda q, k, v: fwd(q, k, v, *meta), q, k, v)
        return out, vjp(do)

    act = lambda h: spec((1, seq_len, h, head_dim) if head_dim == 128 else (1, seq_len, h * head_dim), jnp.bfloat16)  # noqa: E731
    meta = tuple(spec((1, seq_len), jnp.int32) for _ in range(4))
    programs = {}
    for name, fn, args in (
        ("fwd", fwd, (act(hq), act(hkv), act(hkv), *meta)),
        ("fwd+bwd", fwd_bwd, (act(hq), act(hkv), act(hkv), act(hq), *meta)),
    ):
        start = time.time()
        compiled = jax.jit(fn).lower(*args).compile()
        mem = compiled.memory_analysis()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        programs[name] = dict(
            compile_s=time.time() - start,
            flops=float(cost.get("flops", 0.0)),
            bytes=float(cost.get("bytes accessed", 0.0)),
            arg=mem.argument_size_in_bytes,
            out=mem.output_size_in_bytes,
            temp=mem.temp_size_in_bytes,
            kernels=compiled.as_text().count("tpu_custom_call"),
        )
    print(json.dumps(dict(device_kind=dev.device_kind, programs=programs)))


if __name__ == "__main__":
    _main(*sys.argv[1:2], *map(int, sys.argv[2:]))
