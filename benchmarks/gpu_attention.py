"""Split-wise attention on a GPU: the XLA block-sparse path (attention/gpu.py) vs dense XLA attention.

    python benchmarks/gpu_attention.py [--lengths 8192,16384,32768] [--heads 7 --kv_heads 1] [--budget 420]

Rows are packed like ``benchmarks/mask_blocks.py`` (T2I-heavy, VLM-heavy, interleaved; modality-sorted, O(L)
metadata). For each (mix, length) it times, in bf16 with head_dim 128 (one tensor shard of BAGEL-7B: 7 q heads,
1 kv head by default), the forward and forward+backward (grads of q, k, v) of:

* ``gpu``:    ``gpu_attention`` (block-sparse, same block map as the TPU kernel) at each ``--blocks`` size;
* ``dense``:  ``jax.nn.dot_product_attention(implementation="xla")`` with the dense L×L split-wise mask
  (what one writes without a kernel; bf16 matmuls, f32 softmax);
* ``cudnn causal``: cuDNN flash attention with a plain causal mask on the same shapes (not the BAGEL mask:
  the speed a dense fused kernel reaches on a row of this length, for scale).

Columns: L; mix; mask density (allowed (q, kv) pairs ÷ L², padding included); impl; fwd ms and fwd+bwd ms
(median wall time of one jitted call); fwd+bwd vs dense (the dense row's fwd+bwd ms ÷ this row's: above 1 is
faster than dense; for ``cudnn causal`` it compares runs of different masks).

Correctness on the device: the ``gpu`` output and its gradients against the f32 oracle (``reference_attention``)
at the shortest length. Prints a markdown table (median of ``--reps`` timed calls after two warm-ups, ms) and
writes it, with the raw numbers as JSON, to ``--out``. Cases that run out of memory print ``OOM``; cases not
started within ``--budget`` seconds print ``skipped``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from mask_blocks import MIXES, pack_row  # noqa: E402

from bagel_jax.attention.gpu import gpu_attention  # noqa: E402
from bagel_jax.attention.mask import MaskMeta, allowed  # noqa: E402
from bagel_jax.attention.reference import reference_attention  # noqa: E402


def timed(fn, *args, reps: int) -> float:
    """Median wall time (ms) of ``fn(*args)`` after two warm-ups (the first compiles)."""
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def fwd_bwd(attn):
    """q, k, v, do → (out, dq, dk, dv) of ``attn`` (one jitted call)."""

    def run(q, k, v, do):
        out, vjp = jax.vjp(attn, q, k, v)
        return (out, *vjp(do))

    return jax.jit(run)


def implementations(meta: MaskMeta, blocks):
    mask = allowed(meta, meta)[:, None]  # [B, 1, L, L]

    def dense(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")

    def cudnn_causal(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

    impls = {
        f"gpu b{bq}x{bkv}": (lambda q, k, v, bq=bq, bkv=bkv: gpu_attention(q, k, v, meta, block_q=bq, block_kv=bkv))
        for bq, bkv in blocks
    }
    impls["dense xla (mask)"] = dense
    impls["cudnn causal (other mask)"] = cudnn_causal
    return impls


def check(meta, q, k, v, do, blocks) -> dict:
    """Max |error| of the gpu path (fwd, dq, dk, dv) vs the f32 oracle, relative to the oracle's max |value|."""
    ref = fwd_bwd(lambda q, k, v: reference_attention(q, k, v, meta))
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    want = ref(f32(q), f32(k), f32(v), f32(do))
    out = {}
    for bq, bkv in blocks:
        got = fwd_bwd(lambda q, k, v: gpu_attention(q, k, v, meta, block_q=bq, block_kv=bkv))(q, k, v, do)
        out[f"b{bq}x{bkv}"] = [float(jnp.max(jnp.abs(f32(g) - w)) / jnp.max(jnp.abs(w))) for g, w in zip(got, want)]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="8192,16384,32768")
    p.add_argument("--mixes", default=",".join(MIXES))
    p.add_argument("--heads", type=int, default=7)
    p.add_argument("--kv_heads", type=int, default=1)
    p.add_argument("--head_dim", type=int, default=128)
    p.add_argument("--blocks", default="128x128,64x64", help="gpu path tile sizes, comma-separated QxKV")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--budget", type=float, default=420.0, help="seconds; later cases are skipped")
    p.add_argument("--out", default="")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    blocks = [tuple(int(x) for x in b.split("x")) for b in a.blocks.split(",")]
    lengths = [int(x) for x in a.lengths.split(",")]
    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}; bf16, Hq={a.heads}, Hkv={a.kv_heads}, "
        f"hd={a.head_dim}, B=1",
        flush=True,
    )
    start, rng, results, checks = time.time(), np.random.default_rng(a.seed), [], {}
    for length in lengths:
        for mix in a.mixes.split(","):
            row, info = pack_row(rng, mix, length, 512)
            if not info["docs"]:
                raise SystemExit(f"--lengths: no {mix} sample fits a {length}-token row; use >= 4096")
            meta = MaskMeta(*(jnp.asarray(row[f])[None] for f in ("doc", "index", "q_hi", "kv_hi")))
            keys = jax.random.split(jax.random.key(a.seed), 4)
            shape_q, shape_kv = (1, length, a.heads, a.head_dim), (1, length, a.kv_heads, a.head_dim)
            q, do = (jax.random.normal(kk, shape_q, jnp.bfloat16) for kk in keys[:2])
            k, v = (jax.random.normal(kk, shape_kv, jnp.bfloat16) for kk in keys[2:])
            density = float(jnp.mean(allowed(meta, meta)))
            if length == lengths[0] and mix not in checks and time.time() - start < a.budget:
                checks[mix] = check(meta, q, k, v, do, blocks)
                print(f"check {mix} L={length}: rel. max error (out, dq, dk, dv) {checks[mix]}", flush=True)
            for name, attn in implementations(meta, blocks).items():
                rec = dict(length=length, mix=mix, impl=name, density=density, docs=info["docs"])
                if time.time() - start > a.budget:
                    rec.update(fwd_ms="skipped", fwd_bwd_ms="skipped")
                else:
                    for key, fn, args in (
                        ("fwd_ms", jax.jit(attn), (q, k, v)),
                        ("fwd_bwd_ms", fwd_bwd(attn), (q, k, v, do)),
                    ):
                        try:
                            rec[key] = round(timed(fn, *args, reps=a.reps), 3)
                        except Exception as e:  # noqa: BLE001 (OOM or an unsupported cuDNN config: report it)
                            msg = str(e).splitlines()[0][:120]
                            rec[key] = (
                                "OOM" if "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg else f"error: {msg}"
                            )
                results.append(rec)
                print(json.dumps(rec), flush=True)
                if a.out:  # kept as it goes: a run cut short still leaves its numbers
                    with open(a.out + ".partial", "w") as fh:
                        json.dump(dict(results=results, checks=checks), fh, indent=1)
    lines = [
        "| L | mix | mask density | impl | fwd ms | fwd+bwd ms | fwd+bwd vs dense |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        dense = next(
            (
                x["fwd_bwd_ms"]
                for x in results
                if x["length"] == r["length"] and x["mix"] == r["mix"] and x["impl"].startswith("dense")
            ),
            None,
        )
        ratio = (
            f"{dense / r['fwd_bwd_ms']:.2f}×" if isinstance(dense, float) and isinstance(r["fwd_bwd_ms"], float) else ""
        )
        lines.append(
            f"| {r['length'] // 1024}K | {r['mix']} | {r['density']:.3f} | {r['impl']} | {r['fwd_ms']} | "
            f"{r['fwd_bwd_ms']} | {ratio} |"
        )
    table = "\n".join(lines)
    print(table)
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(
                dict(
                    results=results,
                    checks=checks,
                    table=table,
                    device=jax.devices()[0].device_kind,
                    jax=jax.__version__,
                ),
                fh,
                indent=1,
            )
    return results


if __name__ == "__main__":
    main()
