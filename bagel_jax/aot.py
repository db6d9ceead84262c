"""AOT planner: compile the full train step for a TPU topology on this (CPU) host, run nothing.

    python -m bagel_jax.aot --config=configs/bagel_7b_mot.py --topology=v5p:4x4x4 [--step_time=12.5]

Builds compile-only TPU devices (``jax.experimental.topologies``; needs libtpu, the ``[tpu]`` extra), the
mesh of ``config.parallel`` on them, abstract params / optimizer / EMA (``jax.eval_shape``, no arrays) and
an abstract global batch, then lowers and compiles the same ``TrainStep`` the trainer runs. Prints per-chip
HBM (arguments, outputs, temporaries, peak) against the chip's capacity, hardware FLOPs (compiled, each loop ×
its trip count) and model FLOPs (the step lowered without remat) against BAGEL's formula, and the MFU a given
``--step_time`` would mean. A step that does not fit reports XLA's
out-of-memory numbers instead. Use it to choose mesh, remat and batch before paying for a pod.

``--infer`` compiles the KV-cached inference call instead (``infer/step_shapes.py``): prefill ``--requests`` ×
``--cfg_rows`` contexts of ``--context_tokens`` tokens, then one Euler step of an ``--image_size``² image per row,
with params in ``model.param_dtype`` sharded by the training rules on the ``config.parallel`` mesh::

    python -m bagel_jax.aot --infer --config=configs/bagel_7b_mot.py --config.model.param_dtype=bfloat16 \
        --topology=v5e:2x4 --context_tokens=4096 --image_size=1024 --requests=8

The model + loss come from ``LOSSES`` (``register_loss``) or ``--loss=module:builder``: ``bagel`` (the full
model and its losses on a ``PackedBatch`` of the config's budgets; the default) and ``mot_lm`` (the MoT
LanguageModel alone on text and gen token slots: CE + a stand-in squared loss on gen states).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: never contend for /tmp/libtpu_lockfile
if __name__ == "__main__":  # the planner never runs on accelerators; silence libtpu's host probing
    for _k, _v in (
        ("JAX_PLATFORMS", "cpu"),
        ("TPU_ACCELERATOR_TYPE", "v5litepod-4"),
        ("TPU_WORKER_HOSTNAMES", "localhost"),
    ):
        os.environ.setdefault(_k, _v)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bagel_jax.cli import InputError, fail, import_callable, parse_flags, user_errors  # noqa: E402
from bagel_jax.config import validate  # noqa: E402
from bagel_jax.parallel.mesh import abstract_batch, logical_rules, make_mesh  # noqa: E402
from bagel_jax.train import hlo_flops  # noqa: E402
from bagel_jax.train import metrics as metrics_lib  # noqa: E402
from bagel_jax.train.optim import make_optimizer, trainable_mask  # noqa: E402
from bagel_jax.train.state import abstract_state, num_params  # noqa: E402
from bagel_jax.train.step import make_train_step  # noqa: E402


@dataclasses.dataclass
class ModelSpec:
    """What the planner (and the trainer) needs from a model.

    init_fn: rng -> params (boxed with logical names); loss_fn: (params, batch, rng) -> (loss, aux);
    batch: pytree of ``jax.ShapeDtypeStruct`` with the *global* batch shapes;
    batch_metrics_fn: optional batch -> {name: scalar} (e.g. packing stats);
    loss_counts: optional batch -> {term: count} (the unbiased gradient accumulation of ``train/step.py``);
    lm_head_tokens: slots per step the LM head runs on (the FLOP formula's head term; None = every token);
    towers: the ViT patches, VAE images and image (h, w) per step (``metrics.tower_flop_terms``; None: no towers).
    """

    init_fn: Callable[[jax.Array], Any]
    loss_fn: Callable
    batch: Any
    batch_metrics_fn: Callable | None = None
    loss_counts: Callable | None = None
    lm_head_tokens: int | None = None
    towers: dict[str, Any] | None = None


LOSSES: dict[str, Callable[[Any], ModelSpec]] = {}


def register_loss(name: str):
    """Decorator: ``@register_loss("name") def build(config) -> ModelSpec``."""

    def wrap(builder):
        LOSSES[name] = builder
        return builder

    return wrap


def default_loss() -> str:
    return "bagel" if "bagel" in LOSSES else "mot_lm"


@register_loss("bagel")
def _bagel(config) -> ModelSpec:
    """The full BAGEL (ViT, VAE, MoT) and its CE + flow-MSE loss on a ``PackedBatch`` of the config's budgets."""
    from bagel_jax.batch import FIELDS, PackedBatch
    from bagel_jax.data.pack import field_shapes
    from bagel_jax.data.pipeline import budgets_from_config
    from bagel_jax.model.bagel import make_init_fn
    from bagel_jax.train.losses import make_loss_counts, make_loss_fn

    model, init_fn = make_init_fn(config)
    shapes = field_shapes(budgets_from_config(config), config.data.batch_size)
    batch = PackedBatch(**{f: jax.ShapeDtypeStruct(*shapes[f]) for f in FIELDS})
    return ModelSpec(
        init_fn,
        make_loss_fn(model, config),
        batch,
        lambda b: metrics_lib.packing_stats(b.doc),
        loss_counts=make_loss_counts(config),
        lm_head_tokens=config.data.batch_size * (config.data.max_labels_per_row or config.data.und_len),
        towers=dict(  # every slot of the budget, as the step encodes them (the masked canvas on TPU)
            vit_patches=math.prod(batch.vit_patches.shape[:2]),
            vae_images=math.prod(batch.vae_images.shape[:2]),
            image_hw=tuple(batch.vae_images.shape[2:4]),
        ),
    )


@register_loss("mot_lm")
def _mot_lm(config) -> ModelSpec:
    """MoT LanguageModel on a row of U text slots (und expert) and G token slots (gen expert).

    CE (chunked over the sequence, so [B, U, V] logits never exist at once) on und slots + the mean square
    of the final gen states (a FLOP-negligible stand-in for the flow head, so the gen expert is live).
    """
    from bagel_jax.attention.mask import MaskMeta
    from bagel_jax.model import mot
    from bagel_jax.train.losses import ce_sum_count, cross_entropy

    cfg, d = config.model, config.data
    model = mot.LanguageModel(cfg)
    rows, und, gen = d.batch_size, d.und_len, d.gen_len
    chunk = next(c for c in (2048, 1024, 512, 256, 128, und) if und % c == 0)

    def init_fn(rng):
        return mot.init_params(cfg, rng)["params"]

    def loss_fn(params, batch, rng):
        del rng
        meta = MaskMeta(doc=batch["doc"], index=batch["index"], q_hi=batch["q_hi"], kv_hi=batch["kv_hi"])

        def run(m):
            return m(m.embed(batch["text_ids"]), m.embed(batch["gen_ids"]), batch["position"], meta)

        und_h, gen_h = model.apply({"params": params}, method=run)

        @jax.checkpoint
        def chunk_ce(h, labels, weight):
            logits = model.apply({"params": params}, h, method=mot.LanguageModel.logits)
            return ce_sum_count(cross_entropy(logits, labels), weight, False)

        split = lambda x: x.reshape((x.shape[0], und // chunk, chunk) + x.shape[2:]).swapaxes(0, 1)  # noqa: E731
        sums, counts = jax.lax.map(
            lambda xs: chunk_ce(*xs), (split(und_h), split(batch["labels"]), split(batch["ce_weight"]))
        )
        ce_sum, ce_count = jnp.sum(sums), jnp.sum(counts)
        gen_sum = jnp.sum(jnp.mean(jnp.square(gen_h.astype(jnp.float32)), -1))
        gen_count = jnp.asarray(gen_h.shape[0] * gen_h.shape[1], jnp.float32)
        loss = ce_sum / jnp.maximum(ce_count, 1.0) + gen_sum / jnp.maximum(gen_count, 1.0)
        return loss, dict(ce_sum=ce_sum, ce_count=ce_count, gen_sum=gen_sum, gen_count=gen_count)

    i32, f32 = jnp.int32, jnp.float32
    s = jax.ShapeDtypeStruct
    batch = dict(
        text_ids=s((rows, und), i32),
        gen_ids=s((rows, gen), i32),
        labels=s((rows, und), i32),
        ce_weight=s((rows, und), f32),
        **{k: s((rows, und + gen), i32) for k in ("position", "doc", "index", "q_hi", "kv_hi")},
    )
    return ModelSpec(init_fn, loss_fn, batch, lambda b: metrics_lib.packing_stats(b["doc"]), lm_head_tokens=rows * und)


OOM_DETAIL_LINES = 80  # lines of XLA's out-of-memory message the report keeps (its largest-allocation list)


# --- topology --------------------------------------------------------------------------------------


def topology_devices(topology: str, num_slices: int = 1) -> list:
    """Compile-only TPU devices for ``topology`` (e.g. ``v5p:4x4x4``, ``v5e:4x4``, ``v6e:2x2``)."""
    from jax.experimental import topologies

    kw: dict[str, Any] = {}
    if topology.startswith(("v4", "v5p")):
        kw["chip_config_name"] = "megacore"
    if num_slices > 1:
        kw["num_slices"] = num_slices
    if num_slices < 1:
        raise InputError(f"--num_slices: must be >= 1, got {num_slices}")
    try:
        return list(topologies.get_topology_desc(topology, "tpu", **kw).devices)
    except Exception as e:  # libtpu missing or unknown topology
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise InputError(
            f"--topology={topology}: cannot build compile-only TPU devices ({type(e).__name__}: "
            f"{first}); a known topology (e.g. v5e:2x2, v5p:2x2x2) and the [tpu] extra are "
            f"needed"
        ) from None


def resolve_attention(config):
    """On a TPU target, ``auto`` means the Pallas kernel when it is importable, the reference otherwise."""
    if config.model.attention_impl == "auto":
        try:
            import bagel_jax.attention.tpu_split_splash  # noqa: F401

            config.model.attention_impl = "tpu"
        except ImportError:
            config.model.attention_impl = "reference"
    return config.model.attention_impl


# --- plan ------------------------------------------------------------------------------------------


def get_builder(loss: str) -> Callable[[Any], ModelSpec]:
    """A registered name, or ``package.module:function`` (imported; returns a ``ModelSpec`` for a config)."""
    if ":" in loss:
        return import_callable(loss, "--loss")
    if loss not in LOSSES:
        raise InputError(f"--loss: unknown {loss!r} (registered: {', '.join(sorted(LOSSES))})")
    return LOSSES[loss]


def lower_step(config, devices: list, loss: str | None = None):
    """The train step of ``config`` for ``devices``, lowered (no compile): (lowered, spec, abstract state, trainable
    mask, mesh)."""
    builder = get_builder(loss or default_loss())
    mesh = make_mesh(config, devices)
    rules = logical_rules(config)
    spec = builder(config)
    params_shape = jax.eval_shape(spec.init_fn, jax.random.PRNGKey(0))
    tx, schedule = make_optimizer(config.train, params_shape)
    state = abstract_state(spec.init_fn, tx, mesh, rules, tuple(config.train.freeze))
    batch = abstract_batch(spec.batch, mesh, rules)
    trainable = trainable_mask(params_shape, tuple(config.train.freeze))
    step = make_train_step(
        spec.loss_fn,
        tx,
        schedule,
        config,
        mesh=mesh,
        rules=rules,
        state_shardings=jax.tree.map(lambda x: x.sharding, state),
        trainable=trainable,
        batch_metrics_fn=spec.batch_metrics_fn,
        loss_counts=spec.loss_counts,
    )
    return step.lower(state, batch), spec, state, trainable, mesh


def model_flops(config, devices: list, loss: str | None = None) -> float:
    """FLOPs of one train step as the model asks for them: the step lowered with ``model.remat="none"`` (no
    recomputation), XLA's cost analysis of the global (unpartitioned) HLO with each loop × its trip count. No
    compile. Pallas kernels count 0."""
    config = config.copy_and_resolve_references()
    config.model.remat = "none"
    lowered = lower_step(config, devices, loss)[0]
    return hlo_flops.loop_scaled_flops(lowered.as_text(dialect="hlo")).flops


def plan(config, devices: list, loss: str | None = None) -> dict[str, Any]:
    """Compiles the train step of ``config`` for ``devices``; returns sizes, memory, FLOPs and timings.

    FLOPs per step: ``hardware_flops`` (the compiled executable's, all chips, every loop × its trip count; what the
    chips run, remat recomputation included), ``model_flops`` (the same step lowered without remat), their
    difference ``recompute_flops``, and the BAGEL formula's terms (``formula_terms``; ``formula_step_terms`` with the
    LM head on the step's label slots). If XLA runs out of HBM, returns the same dict with ``oom`` = XLA's message
    and no memory or hardware-FLOP fields.
    """
    loss = loss or default_loss()
    get_builder(loss)
    validate(config, num_devices=len(devices), platform=devices[0].platform)
    if config.model.vae.get("encode", "masked") == "auto":  # the target's choice, not this host's (CPU: by_size)
        config.model.vae.encode = "by_size" if devices[0].platform == "cpu" else "masked"
    if config.model.get("mlp_tokens", "auto") == "auto":  # likewise: flat only helps XLA:CPU
        config.model.mlp_tokens = "flat" if devices[0].platform == "cpu" else "batched"
    kind = devices[0].device_kind
    rows, length = config.data.batch_size, config.data.seq_len
    t0 = time.perf_counter()
    lowered, spec, state, trainable, mesh = lower_step(config, devices, loss)
    lower_seconds = time.perf_counter() - t0
    tokens, len_sq = rows * length, rows * length**2
    info = dict(
        loss=loss,
        device_kind=kind,
        num_devices=len(devices),
        mesh=dict(mesh.shape),
        attention=config.model.attention_impl,
        remat=config.model.remat,
        scan_layers=bool(config.model.scan_layers),
        params=num_params(state.params),
        trainable_params=num_params(
            [x for x, keep in zip(jax.tree.leaves(state.params), jax.tree.leaves(trainable)) if keep]
        ),
        hbm_bytes=metrics_lib.hbm_bytes(kind),
        peak_tflops=metrics_lib.peak_tflops(kind, config.train.peak_tflops),
        tokens_per_step=tokens,
        lm_head_tokens=spec.lm_head_tokens,
        formula_flops=metrics_lib.train_flops(config.model, tokens, len_sq),
        formula_flops_causal=metrics_lib.train_flops(config.model, tokens, len_sq, causal=True),
        formula_terms=metrics_lib.train_flop_terms(config.model, tokens, len_sq),
        formula_step_terms=metrics_lib.train_flop_terms(config.model, tokens, len_sq, head_tokens=spec.lm_head_tokens),
        formula_towers=(
            metrics_lib.tower_flop_terms(config.model, **spec.towers, freeze=tuple(config.train.freeze))
            if spec.towers
            else {}
        ),
        lower_seconds=lower_seconds,
    )
    compiled = _compile(lowered, info)
    t0 = time.perf_counter()
    info["model_flops"] = (
        model_flops(config, devices, loss) if config.model.remat != "none" else None
    )  # remat none: the hardware FLOPs (below) are the model FLOPs
    if compiled is None:
        info["flops_seconds"] = time.perf_counter() - t0
        return info
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    hw = hlo_flops.loop_scaled_flops(compiled.as_text())
    n = len(devices)
    if info["model_flops"] is None:
        info["model_flops"] = hw.flops * n
    info.update(
        **_memory(compiled),
        code_bytes=compiled.memory_analysis().generated_code_size_in_bytes,
        compiled_flops_per_device=float(cost.get("flops", 0.0)) if cost else 0.0,
        hardware_flops=hw.flops * n,
        recompute_flops=hw.flops * n - info["model_flops"],
        flops_loops=hw.loops,
        flops_unknown_loops=hw.unknown,
        flops_seconds=time.perf_counter() - t0,
        compiled=compiled,
    )
    return info


@contextlib.contextmanager
def no_compilation_cache_writes():
    """No JAX persistent-cache entries are written inside: a compile-only TPU executable cannot be loaded back (no
    TPU client to load it into), so with a cache dir set for CPU work it would only add entries that fail to read."""
    before = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float("inf"))
    try:
        yield
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before)


def _compile(lowered, info: dict[str, Any]):
    """``lowered.compile()``, recording ``compile_seconds`` in ``info``; None when the plan does not fit, with
    ``oom`` (XLA's first line) and ``oom_detail`` (its list of the largest allocations: what dominates) in ``info``."""
    t0 = time.perf_counter()
    try:
        with no_compilation_cache_writes():
            compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        lines = str(e).strip().splitlines()
        info.update(oom=lines[0], oom_detail=lines[1:OOM_DETAIL_LINES], compile_seconds=time.perf_counter() - t0)
        return None
    info["compile_seconds"] = time.perf_counter() - t0
    return compiled


def _memory(compiled) -> dict[str, Any]:
    mem = compiled.memory_analysis()
    return dict(
        argument_bytes=mem.argument_size_in_bytes,
        output_bytes=mem.output_size_in_bytes,
        temp_bytes=mem.temp_size_in_bytes,
        alias_bytes=mem.alias_size_in_bytes,
        peak_bytes=mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        + mem.temp_size_in_bytes
        - mem.alias_size_in_bytes,
    )


def plan_inference(
    config, devices: list, *, context_tokens: int, image_size: int, requests: int, cfg_rows: int = 3
) -> dict[str, Any]:
    """Compiles the KV-cached prefill + one Euler step (``cached_image``'s velocity program) for ``devices``;
    returns sizes and per-chip memory (or ``oom``)."""
    from bagel_jax.infer.cached_image import _build_velocity
    from bagel_jax.infer.programs import inference_model
    from bagel_jax.infer.step_shapes import image_step_inputs
    from bagel_jax.model.bagel import make_init_fn
    from bagel_jax.parallel.mesh import logical_shardings, use_mesh

    for name, v in (("context_tokens", context_tokens), ("image_size", image_size), ("requests", requests)):
        if v < 1:
            raise InputError(f"--{name}: must be >= 1, got {v}")
    if cfg_rows not in (1, 2, 3):
        raise InputError(f"--cfg_rows: 1, 2 or 3 (gen, + cfg_text, + cfg_img), got {cfg_rows}")
    config.data.batch_size = len(devices)  # training's rows-per-mesh check; the inference rows are set below
    validate(config, num_devices=len(devices), platform=devices[0].platform)
    mesh, rules = make_mesh(config, devices), logical_rules(config)
    model, init_fn = make_init_fn(config)
    boxed = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
    dtype = jnp.dtype(config.model.param_dtype)
    params = jax.tree.map(
        lambda a, sh: jax.ShapeDtypeStruct(a.shape, dtype, sharding=sh),
        nn_unbox(boxed),
        logical_shardings(boxed, mesh, rules),
    )
    side = image_size // (8 * config.model.latent_patch_size) * 8 * config.model.latent_patch_size
    inputs = image_step_inputs(
        config.model, mesh, context_tokens=context_tokens, image_hw=(side, side), requests=requests, branches=cfg_rows
    )
    kind = devices[0].device_kind
    info = dict(
        mode="infer",
        device_kind=kind,
        num_devices=len(devices),
        mesh=dict(mesh.shape),
        attention=config.model.attention_impl,
        params=num_params(params),
        param_dtype=str(dtype),
        hbm_bytes=metrics_lib.hbm_bytes(kind),
        context_tokens=context_tokens,
        image_size=side,
        requests=requests,
        cfg_rows=cfg_rows,
    )
    program = _build_velocity(inference_model(model))
    t0 = time.perf_counter()
    with use_mesh(mesh, rules):
        lowered = program.lower(params, *inputs)
    info["lower_seconds"] = time.perf_counter() - t0
    compiled = _compile(lowered, info)
    if compiled is None:
        return info
    info.update(_memory(compiled), compiled=compiled)
    return info


def nn_unbox(tree):
    from flax.core import meta

    return meta.unbox(tree)


def report_inference(p: dict[str, Any]) -> str:
    """Human-readable lines of a ``plan_inference``."""
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    lines = [
        f"inference       prefill {p['requests']} × {p['cfg_rows']} rows of {p['context_tokens']} tokens, then one "
        f"Euler step of a {p['image_size']}² image per row; attention={p['attention']}",
        f"devices         {p['num_devices']} × {p['device_kind']}   mesh {p['mesh']}",
        f"params          {p['params'] / 1e9:.3f} B in {p['param_dtype']}",
    ]
    if "oom" in p:
        return "\n".join(lines + [f"per-chip HBM    DOES NOT FIT: {p['oom']}"])
    hbm = p["hbm_bytes"]
    fits = "unknown chip" if not hbm else ("FITS" if p["peak_bytes"] <= hbm else "DOES NOT FIT")
    lines += [
        f"per-chip HBM    arguments {gib(p['argument_bytes'])} | outputs {gib(p['output_bytes'])} | "
        f"temporaries {gib(p['temp_bytes'])}",
        f"                peak ≈ {gib(p['peak_bytes'])} of {gib(hbm) if hbm else '?'} per chip → {fits}",
        f"compile         lower {p['lower_seconds']:.1f} s, compile {p['compile_seconds']:.1f} s",
    ]
    return "\n".join(lines)


def flop_lines(p: dict[str, Any]) -> list[str]:
    """The FLOPs-per-step lines of a ``plan``'s report: hardware vs model FLOPs, and the BAGEL formula's terms."""
    f, fs = p["formula_terms"], p["formula_step_terms"]
    lines = []
    if "hardware_flops" in p:
        lines.append(
            f"FLOPs / step    hardware {p['hardware_flops']:.4g} (compiled, loops × trip count; XLA alone counts "
            f"each loop once: {p['compiled_flops_per_device'] * p['num_devices']:.4g}) = model "
            f"{p['model_flops']:.4g} + remat recompute {p['recompute_flops']:.4g}; Pallas kernels count 0"
        )
        if p.get("flops_unknown_loops"):
            lines.append(
                f"                loops counted once (trip count unknown): {', '.join(p['flops_unknown_loops'])}"
            )
    elif p.get("model_flops") is not None:
        lines.append(f"FLOPs / step    model {p['model_flops']:.4g} (lowered without remat; Pallas kernels count 0)")
    lines.append(
        f"                BAGEL formula {p['formula_flops']:.4g} (causal-halved {p['formula_flops_causal']:.4g}), "
        f"{p['tokens_per_step']} tokens, one sample per row: attention {f['attention']:.4g} + non-attention "
        f"{f['non_attention']:.4g} (layers {f['layers']:.4g}, embedding {f['embedding']:.4g}, LM head "
        f"{f['lm_head']:.4g})"
    )
    if p.get("model_flops") is not None:
        head = p.get("lm_head_tokens")
        lines.append(
            f"                model / formula non-attention {p['model_flops'] / f['non_attention']:.3f}"
            + (
                f"; / the formula's matmuls at this step's {head} LM-head slots ({fs['matmuls']:.4g}): "
                f"{p['model_flops'] / fs['matmuls']:.3f}"
                if head is not None
                else ""
            )
        )
        towers = p.get("formula_towers") or {}
        if towers and head is not None:
            whole = fs["matmuls"] + sum(towers.values())
            lines.append(
                f"                + the towers the formula leaves out (ViT + connector {towers['vit']:.4g}, frozen VAE "
                f"encoder {towers['vae_encode']:.4g}): {whole:.4g}; model / that {p['model_flops'] / whole:.3f}"
            )
    return lines


def report(p: dict[str, Any], step_time: float = 0.0) -> str:
    """Human-readable table of a ``plan``."""

    def gib(b):
        return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.2f} MiB"

    def count(n):
        return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.3f} M"

    hbm = p["hbm_bytes"]
    lines = [
        f"model/loss      {p['loss']}  attention={p['attention']}  remat={p['remat']}",
        f"devices         {p['num_devices']} × {p['device_kind']}   mesh {p['mesh']}",
        f"params          {count(p['params'])} ({count(p['trainable_params'])} trainable)",
    ]
    if "oom" in p:
        lines += [
            f"per-chip HBM    DOES NOT FIT: {p['oom']}",
            *flop_lines(p),
            f"compile         lower {p['lower_seconds']:.1f} s, compile {p['compile_seconds']:.1f} s",
        ]
        if p.get("oom_detail"):
            lines += ["largest buffers (XLA):"] + ["  " + x for x in p["oom_detail"]]
        return "\n".join(lines)
    fits = "unknown chip" if not hbm else ("FITS" if p["peak_bytes"] <= hbm else "DOES NOT FIT")
    lines += [
        f"per-chip HBM    arguments {gib(p['argument_bytes'])} | outputs {gib(p['output_bytes'])} | "
        f"temporaries {gib(p['temp_bytes'])} | aliased {gib(p['alias_bytes'])}",
        f"                peak ≈ {gib(p['peak_bytes'])} of {gib(hbm) if hbm else '?'} per chip → {fits}",
        *flop_lines(p),
        f"compile         lower {p['lower_seconds']:.1f} s, compile {p['compile_seconds']:.1f} s, FLOP count "
        f"{p['flops_seconds']:.1f} s",
    ]
    if step_time > 0 and p["peak_tflops"]:
        denom = step_time * p["num_devices"] * p["peak_tflops"] * 1e12
        lines.append(
            f"MFU @ {step_time:g} s/step  formula {p['formula_flops'] / denom:.1%} "
            f"(causal {p['formula_flops_causal'] / denom:.1%}), model {p['model_flops'] / denom:.1%} + attention "
            f"kernels, hardware {p['hardware_flops'] / denom:.1%} + attention kernels; "
            f"{p['tokens_per_step'] / step_time / p['num_devices']:.0f} tokens/s/chip"
        )
    return "\n".join(lines)


def main(argv):
    """The planner's CLI: a bad flag, config or topology is one line on stderr and exit status 2, before the
    topology is built or anything compiles."""
    from absl import flags

    FLAGS = flags.FLAGS
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}")
    cfg = FLAGS.config
    with user_errors():
        if FLAGS.step_time < 0:
            raise InputError(f"--step_time: must be >= 0, got {FLAGS.step_time}")
        get_builder(FLAGS.loss or default_loss())
        resolve_attention(cfg)
        validate(cfg, platform="tpu")  # the config alone, before libtpu builds the topology
        devices = topology_devices(FLAGS.topology, FLAGS.num_slices)
        if FLAGS.infer:
            kw = dict(context_tokens=FLAGS.context_tokens, image_size=FLAGS.image_size, requests=FLAGS.requests)
            print(report_inference(plan_inference(cfg, devices, cfg_rows=FLAGS.cfg_rows, **kw)))
            return
        p = plan(cfg, devices, FLAGS.loss or None)
    print(report(p, FLAGS.step_time))


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "config file (configs/*.py)", lock_config=False)
    flags.DEFINE_string("topology", "v5e:2x2", "TPU topology, e.g. v5p:4x4x4, v5e:4x4, v6e:8x8")
    flags.DEFINE_integer("num_slices", 1, "number of slices (multi-slice, with parallel.dcn_*)")
    flags.DEFINE_float("step_time", 0.0, "seconds per step to turn FLOPs into MFU")
    flags.DEFINE_string("loss", "", f"registered model/loss name or module:builder (default {default_loss()!r})")
    flags.DEFINE_bool("infer", False, "compile the KV-cached inference call (prefill + one Euler step) instead")
    flags.DEFINE_integer("context_tokens", 4096, "--infer: tokens of each context row")
    flags.DEFINE_integer("image_size", 1024, "--infer: side of the generated square image (pixels)")
    flags.DEFINE_integer("requests", 8, "--infer: requests per call (each with --cfg_rows context rows)")
    flags.DEFINE_integer("cfg_rows", 3, "--infer: CFG branches per request (gen, cfg_text, cfg_img)")
    flags.mark_flags_as_required(["config"])


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main, argv=sys.argv, flags_parser=parse_flags)
