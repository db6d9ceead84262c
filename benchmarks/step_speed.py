"""Tokens/s of one full BAGEL train step on this machine's CPU: the dense attention oracle vs ``attention_impl="auto"``.

    python benchmarks/step_speed.py [--packs 1024,4096] [--models 96x3,256x4] [--steps 3] [--warm_pass]
        [--out step_speed.json]

What one step is: ``make_train_step`` on the BAGEL loss exactly as the trainer runs it (forward of the frozen
VAE encode, ViT, MoT LLM; CE + flow loss; backward; global-norm clip; AdamW; EMA), fp32, one packed row per step,
the host batch put on the device by ``shard_batch`` inside the timed region (the data pipeline is not timed).

Data: synthetic shapes rendered into a temporary directory, packed by the project's grain pipeline with the
configs/tiny_repro.py layout (42 px ViT images, 48 px VAE images) and the t2i / vlm / edit mixture 2.0 / 1.5 / 0.5
(pinned: the official side's, benchmarks/official_step_speed.py) into rows of ``seq_len`` tokens, budgets fitted to
the mix as a user sizes a row: und 7/8 of the row (this mix's und share of real tokens is 86–89%), the ViT patch,
VAE image and document-buffer caps never binding. Each step gets the next row (the same rows for every case).

Models: ``HxN`` = hidden H, N MoT layers, 4 q / 2 kv heads, MLP 4·H; ViT 3 × 64 and the tiny VAE (ch 32) of
tiny_repro. Initialised from random weights (speed does not depend on them).

Columns: model; pack (seq_len, and the mean real tokens of the timed rows); for each impl, the mean seconds of one
step over ``--steps`` timed rows after one warm-up row (the compile; with ``--warm_pass`` the timed rows also run
once untimed first: steady state, past each branch's first run and the allocator's first faults), each step waited
for, and tokens/s = real tokens ÷ seconds; "dispatched ahead": the mean seconds per step of the same rows
dispatched back to back and waited for once, as bagel_jax.train's loop runs (the host's ``shard_batch`` and
dispatch overlap the previous step);
speed-up = reference seconds ÷ auto seconds. ``reference`` is the dense oracle over the whole row (an L × L mask per
head) with the VAE encoding every image slot's full masked canvas (``model.vae.encode="masked"``) and the MLPs on
[B, T, D] (``model.mlp_tokens="batched"``): this project's CPU step before ``auto``; ``auto`` resolves, on CPU, to
the XLA block-sparse path (attention/gpu.py, 32-token tiles), the VAE encode by size (model/vae_batch.py: real
images only), the MLPs on [B·T, D] (model/layers.py ``flat_mlp``) and the ViT on the used prefix of its patch slots
(model/vit_prefix.py; the reference runs it on all ``max_vit_patches`` slots) and the fused parameter update
(train/update.py; the reference: optax's chain, ``train.update_impl="optax"``). Both compile with XLA's own
convolutions (bagel_jax/xla_cpu.py); run as a program, this file re-executes itself once with glibc's huge-page
tunable, as bagel_jax's CPU programs do (bagel_jax/huge_pages.py; ``BAGEL_JAX_HUGE_PAGES=0``: without). Times are
wall clock on a machine that may be shared: rerun for stable numbers; the printed CPU s/step (process CPU time, all
threads) is less sensitive to other jobs.

Measured side by side with the official PyTorch code (2 cores, fp32: this file with ``--impls auto --models M
--packs 1024,4096 --steps 5``, and ``benchmarks/official_step_speed.py`` with the same model, packs and steps,
``--threads 2``, interleaved per model: ours, official, official, ours; the official packs are built by its own
``PackedDataset`` loop from samples of the same layout and mixture; docs/EXPERIMENTS.md, twelfth session; each of
our steps waited for, "ahead" in brackets; 512×8 / 1K run twice, minutes apart):

| model | pack | ours: real tokens, s/step, rounds 1 / 2 (ahead) | official: tokens, s/step | ours ÷ official |
|---|---|---|---|---|
| 96×3 | 1024 | 1003, 0.139 / 0.127 (0.112 / 0.109) | 1014, 0.127 / 0.131 | 0.91 / 1.02× (1.12 / 1.19×) |
| 256×4 | 1024 | 1003, 0.288 / 0.293 (0.284 / 0.300) | 1014, 0.352 / 0.342 | 1.21 / 1.16× (1.23 / 1.13×) |
| 512×8 | 1024 | 1003, 1.681 / 1.410; 1.346 / 1.343 | 1014, 1.489 / 1.497; 1.470 / 1.490 | 0.88 / 1.05×; 1.08 / 1.10× |
| 96×3 | 4096 | 3965, 0.362 / 0.352 (0.334 / 0.317) | 4083, 0.447 / 0.427 | 1.20 / 1.18× (1.30 / 1.31×) |
| 256×4 | 4096 | 3965, 1.016 / 1.155 (1.085 / 1.075) | 4083, 1.097 / 1.081 | 1.05 / 0.91× (0.98 / 0.98×) |
| 512×8 | 4096 | 3965, 4.845 / 4.755 (4.903 / 4.651) | 4083, 4.945 / 4.923 | 0.99 / 1.01× (0.98 / 1.03×) |

The host was noisy: the same code's 256×4 / 4K step took 1.016 and 1.155 s in one run, 512×8 / 1K 1.681 s in one
round and 1.34–1.41 s in the three others. Dispatching ahead helps the smallest steps most and can cost at 4K, where
the host's work for the next step competes with the step's own two threads. By process CPU seconds per token the
ratio is 0.97–1.45 (0.97–1.17 at 512×8). The official figures are better than those in issue 27's table (e.g.
96×3 at 4K: 0.34–0.45 s for 4083 tokens against 1.037 s for 4030): that table's packs were built from another
layout (its VAE encode of 34 images took 0.86 s).

In steady state (``--warm_pass`` here and on the official side, the same protocol; docs/EXPERIMENTS.md, thirteenth
and fourteenth sessions), ours ÷ official: 0.89–1.31 / 0.90–1.12 / 1.02–1.06× at 1K (96×3, 256×4, 512×8), 1.02–1.27
/ 0.94–1.09 / 0.97–1.08× at 4K; the official code gains as much from the warm pass as ours, and most rounds under
1.0× hold one outlier step on one side or the other.

Against the dense reference (a loaded CPU, an earlier run): 96×3 / 1024: 12.546 → 0.734 s/step (17.1×); 96×3 /
4096: 27.76 → 0.994 CPU s/step (27.9×).
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
if __name__ == "__main__":  # as bagel_jax runs on CPU: XLA's large buffers on huge pages (bagel_jax/huge_pages.py)
    from bagel_jax.huge_pages import reexec_with_huge_pages

    reexec_with_huge_pages(program=True)

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
    # budgets fitted to the mix, as a user sizes a row (benchmarks/pack_fill.py): und slots are 86–89% of this mix's
    # real tokens, so und 7/8 of the row; the ViT patches, VAE images and the packer's document buffer never bind
    und_len = seq_len * 7 // 8
    c.data.update(
        data_dir=data_dir,
        synthetic_examples=0,
        num_workers=0,
        batch_size=1,
        seq_len=seq_len,
        und_len=und_len,
        gen_len=seq_len - und_len,
        max_vit_patches=und_len,
        max_vae_images=seq_len // 32,
        pack_buffer=seq_len // 16,
        # the mixture of the official side (benchmarks/official_step_speed.py), pinned here against config changes
        mixture=dict(t2i=2.0, vlm=1.5, edit=0.5, video=0.0, web=0.0),
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
    # project's CPU step before); auto encodes the real images by size, runs the MLPs on [B·T, D] and the ViT on the
    # used prefix of its patch slots
    c.model.vae.encode = "masked" if impl == "reference" else "auto"
    c.model.mlp_tokens = "batched" if impl == "reference" else "auto"
    c.model.vit_patches = "all" if impl == "reference" else "auto"
    c.train.update_impl = "optax" if impl == "reference" else "auto"
    c.evals = {}
    c.train.update(sample_every=0, warmup_steps=1)
    return validate(c)


def time_steps(config, batches, warm_pass: bool = False) -> tuple[list[float], float]:
    """Seconds of each train step on ``batches[1:]`` after one warm-up step on ``batches[0]`` (the compile), each
    waited for; then the mean seconds per step of the same rows dispatched back to back and waited for once at the
    end, as bagel_jax.train's loop runs them (it waits only to log): the host's work for a step (``shard_batch``,
    the dispatch) then overlaps the previous step's compute. ``warm_pass``: all rows run once untimed first, so the
    timed steps are in steady state (every branch the rows take has run once, the allocator has settled)."""
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
    if warm_pass:  # untimed: the compile, and the one-time costs of the rows' first runs
        for batch in batches:
            state, metrics = step(state, shard_batch(batch, mesh, rules))
        jax.block_until_ready(state)
    for i, batch in enumerate(batches):
        t, cpu = time.perf_counter(), time.process_time()
        state, metrics = step(state, shard_batch(batch, mesh, rules))
        jax.block_until_ready((state, metrics))
        if i:
            times.append(time.perf_counter() - t)
            CPU_SECONDS.append(time.process_time() - cpu)
        if not np.isfinite(float(metrics["loss"])):
            raise RuntimeError(f"non-finite loss at step {i}")
    t = time.perf_counter()
    for batch in batches[1:]:
        state, metrics = step(state, shard_batch(batch, mesh, rules))
    jax.block_until_ready((state, metrics))
    ahead = (time.perf_counter() - t) / max(len(batches) - 1, 1)
    if not np.isfinite(float(metrics["loss"])):
        raise RuntimeError("non-finite loss after the steps dispatched ahead")
    return times, ahead


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--packs", default="1024,4096", help="row lengths (multiples of 512)")
    p.add_argument("--models", default="96x3,256x4", help="HIDDENxLAYERS, comma separated")
    p.add_argument("--steps", type=int, default=3, help="timed steps per case (after one warm-up)")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument(
        "--warm_pass",
        action="store_true",
        help="steady state: run the timed rows once untimed after the compile, then time them",
    )
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
            f"mean over {args.steps} rows after 1 warm-up row{' and a warm pass over them' if args.warm_pass else ''}",
            flush=True,
        )
        for seq_len in packs:
            # a new row every step (the same rows for every model and impl): tokens/s = real tokens ÷ seconds,
            # both summed over the timed rows
            rows_it = make_train_iterator(bench_config(data_dir, seq_len, 96, 3, "reference"))
            batches = [next(rows_it) for _ in range(args.steps + 1)]
            real = float(np.mean([(np.asarray(b.doc) != 0).sum() for b in batches[1:]]))
            for hidden, layers in models:
                secs, ahead = {}, {}
                for impl in impls:
                    del CPU_SECONDS[:]
                    times, ahead[impl] = time_steps(
                        bench_config(data_dir, seq_len, hidden, layers, impl), batches, args.warm_pass
                    )
                    secs[impl] = float(np.mean(times))
                    cpu = list(CPU_SECONDS)
                    raw.append(
                        dict(
                            model=f"{hidden}x{layers}",
                            seq_len=seq_len,
                            real_tokens=real,
                            impl=impl,
                            step_s=times,
                            step_cpu_s=cpu,
                            step_ahead_s=ahead[impl],
                            warm_pass=args.warm_pass,
                        )
                    )
                    print(
                        f"  {hidden}x{layers} L={seq_len} {impl}: {secs[impl]:.3f} s/step "
                        f"({real / secs[impl]:.0f} tokens/s; {np.median(cpu):.3f} CPU s/step; dispatched ahead "
                        f"{ahead[impl]:.3f} s/step)",
                        flush=True,
                    )
                rows.append((hidden, layers, seq_len, real, secs, ahead))
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    head = "| model | pack (real tokens) | "
    head += " | ".join(f"{i} s/step | {i} tokens/s | {i} s/step dispatched ahead" for i in impls)
    head += " | speed-up |" if set(IMPLS) <= set(impls) else " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for hidden, layers, seq_len, real, secs, ahead in rows:
        cells = [f"{hidden}×{layers}", f"{seq_len} ({real:.0f})"]
        cells += [c for i in impls for c in (f"{secs[i]:.3f}", f"{real / secs[i]:.0f}", f"{ahead[i]:.3f}")]
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
