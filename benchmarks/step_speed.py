"""Tokens/s of one full BAGEL train step on this machine's CPU: the dense attention oracle vs ``attention_impl="auto"``.

    python benchmarks/step_speed.py [--packs 1024,4096] [--models 96x3,256x4] [--steps 3] [--out step_speed.json]

What one step is: ``make_train_step`` on the BAGEL loss exactly as the trainer runs it (forward of the frozen
VAE encode, ViT, MoT LLM; CE + flow loss; backward; global-norm clip; AdamW; EMA), fp32, one packed row per step,
the host batch put on the device by ``shard_batch`` inside the timed region (the data pipeline is not timed).

Data: synthetic shapes rendered into a temporary directory, packed by the project's grain pipeline with the
configs/tiny_repro.py layout (42 px ViT images, 48 px VAE images, t2i/vlm/edit mixture) into rows of ``seq_len``
tokens (und 3/4, gen 1/4; ViT patches and VAE images budgeted like configs/tiny.py, scaled with the row).

Models: ``HxN`` = hidden H, N MoT layers, 4 q / 2 kv heads, MLP 4·H; ViT 3 × 64 and the tiny VAE (ch 32) of
tiny_repro. Initialised from random weights (speed does not depend on them).

Columns: model; pack (seq_len, and the real tokens in the timed row); for each impl, the median seconds of one step
over ``--steps`` timed steps after one warm-up step (the compile), and tokens/s = real tokens ÷ that median;
speed-up = reference seconds ÷ auto seconds. ``reference`` is the dense oracle over the whole row (an L × L mask per
head) with the VAE encoding every image slot's full masked canvas (``model.vae.encode="masked"``) and the MLPs on
[B, T, D] (``model.mlp_tokens="batched"``): this project's CPU step before ``auto``; ``auto`` resolves, on CPU, to
the XLA block-sparse path (attention/gpu.py, 32-token tiles), the VAE encode by size (model/vae_batch.py: real
images only) and the MLPs on [B·T, D] (model/layers.py ``flat_mlp``). Times are wall clock on a machine that may be
shared: rerun for stable numbers; the printed CPU s/step (process CPU time, all threads) is less sensitive to other
jobs.

Measured (2 idle cores, fp32, ``--impls auto --models 96x3,256x4,512x8 --steps 5``; "official" is the issue's
side-by-side measurement of the PyTorch code on this CPU, 876- and 4030-token packs; docs/EXPERIMENTS.md):

| model | pack (real tokens) | auto s/step | auto tokens/s | official tokens/s | ratio |
|---|---|---|---|---|---|
| 96×3 | 1024 (863) | 0.111 | 7784 | 4735 | 1.64× |
| 256×4 | 1024 (863) | 0.300 | 2877 | 2576 | 1.12× |
| 512×8 | 1024 (863) | 1.429 | 604 | 590 | 1.02× |
| 96×3 | 4096 (3072) | 0.381 | 8063 | 3886 | 2.07× |
| 256×4 | 4096 (3072) | 1.023 | 3002 | 2506 | 1.20× |
| 512×8 | 4096 (3072) | 5.079 | 605 | 635 | 0.95× |

Against the dense reference (a loaded CPU, an earlier run): 96×3 / 1024: 12.546 → 0.734 s/step (17.1×); 96×3 /
4096: 27.76 → 0.994 CPU s/step (27.9×). At 512×8 the step is bound by the MoT matmuls, and a 4K row's 1024 padded
slots (the tiny_repro budgets scaled) cost their share.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a CPU benchmark: do not probe for accelerators

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bagel_jax.attention import resolve_impl  # noqa: E402
from bagel_jax.config import validate  # noqa: E402
from bagel_jax.data.builders import synthetic_shapes  # noqa: E402
from bagel_jax.data.pipeline import make_train_iterator  # noqa: E402
from bagel_jax.launch_utils import load_config  # noqa: E402
from bagel_jax.model.bagel import make_init_fn  # noqa: E402
from bagel_jax.parallel.mesh import logical_rules, make_mesh, shard_batch  # noqa: E402
from bagel_jax.train.losses import make_loss_fn  # noqa: E402
from bagel_jax.train.metrics import packing_stats  # noqa: E402
from bagel_jax.train.optim import make_optimizer, trainable_mask  # noqa: E402
from bagel_jax.train.state import create_train_state  # noqa: E402
from bagel_jax.train.step import make_train_step  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPLS = ("reference", "auto")
CPU_SECONDS: list[float] = []  # process CPU seconds (all threads) of each timed step: robust to other jobs' load


def bench_config(data_dir: str, seq_len: int, hidden: int, layers: int, impl: str):
    """configs/tiny_repro.py with one row of ``seq_len`` tokens, the model ``hidden × layers`` and ``impl``."""
    c = load_config(os.path.join(ROOT, "configs", "tiny_repro.py"))
    scale = seq_len // 512  # budgets of configs/tiny.py (512-token rows) scaled with the row
    c.data.update(
        data_dir=data_dir,
        synthetic_examples=0,
        num_workers=0,
        batch_size=1,
        seq_len=seq_len,
        und_len=seq_len * 3 // 4,
        gen_len=seq_len // 4,
        max_vit_patches=128 * scale,
        max_vae_images=8 * scale,
    )
    c.model.update(
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_layers=layers,
        num_heads=4,
        num_kv_heads=2,
        attention_impl=impl,
    )
    # the dense oracle's step encodes every VAE slot's full masked canvas and runs the MLPs on [B, T, D] (this
    # project's CPU step before); auto encodes the real images by size and runs the MLPs on [B·T, D]
    c.model.vae.encode = "masked" if impl == "reference" else "auto"
    c.model.mlp_tokens = "batched" if impl == "reference" else "auto"
    c.evals = {}
    c.train.update(sample_every=0, warmup_steps=1)
    return validate(c)


def time_steps(config, batch, steps: int) -> list[float]:
    """Seconds of each of ``steps`` train steps after one warm-up step (the compile)."""
    mesh, rules = make_mesh(config, jax.devices()[:1]), logical_rules(config)
    model, init_fn = make_init_fn(config)
    abstract = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
    optimizer, schedule = make_optimizer(config.train, abstract)
    state, shardings = create_train_state(init_fn, optimizer, mesh, rules, jax.random.PRNGKey(0))
    step = make_train_step(
        make_loss_fn(model, config),
        optimizer,
        schedule,
        config,
        mesh=mesh,
        rules=rules,
        state_shardings=shardings,
        trainable=trainable_mask(abstract, tuple(config.train.freeze)),
        batch_metrics_fn=lambda b: packing_stats(b.doc),
    )
    times = []
    for i in range(steps + 1):
        t, cpu = time.perf_counter(), time.process_time()
        state, metrics = step(state, shard_batch(batch, mesh, rules))
        jax.block_until_ready((state, metrics))
        if i:
            times.append(time.perf_counter() - t)
            CPU_SECONDS.append(time.process_time() - cpu)
        if not np.isfinite(float(metrics["loss"])):
            raise RuntimeError(f"non-finite loss at step {i}")
    return times


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--packs", default="1024,4096", help="row lengths (multiples of 512)")
    p.add_argument("--models", default="96x3,256x4", help="HIDDENxLAYERS, comma separated")
    p.add_argument("--steps", type=int, default=3, help="timed steps per case (after one warm-up)")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--out", default="", help="also write the table and raw numbers as JSON here")
    args = p.parse_args(argv)
    packs = [int(x) for x in args.packs.split(",")]
    if any(x % 512 for x in packs):
        p.error("--packs: row lengths must be multiples of 512")
    models = [tuple(int(v) for v in m.split("x")) for m in args.models.split(",")]
    impls = args.impls.split(",")
    data_dir = tempfile.mkdtemp(prefix="step_speed_")
    rows, raw = [], []
    try:
        synthetic_shapes.build(data_dir, num_examples=800, seed=0, square=True)
        print(
            f"backend {jax.default_backend()}, {os.cpu_count()} CPUs; auto → {resolve_impl('auto')}; "
            f"median of {args.steps} steps after 1 warm-up",
            flush=True,
        )
        for seq_len in packs:
            batch = next(make_train_iterator(bench_config(data_dir, seq_len, 96, 3, "reference")))
            real = int((np.asarray(batch.doc) != 0).sum())
            for hidden, layers in models:
                secs = {}
                for impl in impls:
                    del CPU_SECONDS[:]
                    times = time_steps(bench_config(data_dir, seq_len, hidden, layers, impl), batch, args.steps)
                    secs[impl] = float(np.median(times))
                    cpu = list(CPU_SECONDS)
                    raw.append(
                        dict(
                            model=f"{hidden}x{layers}",
                            seq_len=seq_len,
                            real_tokens=real,
                            impl=impl,
                            step_s=times,
                            step_cpu_s=cpu,
                        )
                    )
                    print(
                        f"  {hidden}x{layers} L={seq_len} {impl}: {secs[impl]:.3f} s/step "
                        f"({real / secs[impl]:.0f} tokens/s; {np.median(cpu):.3f} CPU s/step)",
                        flush=True,
                    )
                rows.append((hidden, layers, seq_len, real, secs))
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    head = "| model | pack (real tokens) | " + " | ".join(f"{i} s/step | {i} tokens/s" for i in impls)
    head += " | speed-up |" if set(IMPLS) <= set(impls) else " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for hidden, layers, seq_len, real, secs in rows:
        cells = [f"{hidden}×{layers}", f"{seq_len} ({real})"]
        cells += [c for i in impls for c in (f"{secs[i]:.3f}", f"{real / secs[i]:.0f}")]
        if set(IMPLS) <= set(impls):
            cells.append(f"{secs['reference'] / secs['auto']:.1f}×")
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(table=table, raw=raw), f, indent=1)


if __name__ == "__main__":
    main()
