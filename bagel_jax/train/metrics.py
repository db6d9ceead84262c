"""Training metrics: BAGEL's FLOP formula, MFU, packing stats, and the writers (TensorBoard + JSON lines).

FLOPs per step follow the reference (bagel.md §7.5, ``qwen2_flop_coefficients``): the LLM only, one
expert (= the active params of a token), attention as dense ``len²`` per sample::

    N      = (3·D·I + D·(2·Hq·hd + 2·Hkv·hd))·L + 2·V·D
    flops  = 6·N·Σtokens + 12·hd·Hq·L·Σ_samples len²

``causal=True`` halves the attention term (a causal mask computes about half the score matrix); MFU is
reported both ways. clu (which imports TensorFlow, ~2 s) is imported only when a writer is created.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bagel_jax.config import head_dim

# Dense bf16 peak TFLOP/s per JAX device, matched by substring of ``device.device_kind`` (lower case), longest
# key first. TPU v4/v5p run as megacore (one device per chip); TPU7x exposes each of its 2 TensorCores as a
# device (2307 TFLOP/s per chip). GPU values are the reference's ``detect_peak_tflops`` table.
PEAK_TFLOPS: dict[str, float] = {
    "tpu v4": 275.0,
    "tpu v5 lite": 197.0,
    "tpu v5e": 197.0,
    "tpu v5p": 459.0,
    "tpu v5": 459.0,
    "tpu v6 lite": 918.0,
    "tpu v6e": 918.0,
    "tpu7x": 1153.5,
    "mi300x": 1336.0,
    "h100": 989.0,
    "h800": 989.0,
    "h200": 989.0,
    "h20": 148.0,
    "a100": 312.0,
    "a800": 312.0,
    "l40": 181.05,
    "l20": 119.5,
    "910b": 354.0,
}
# HBM per JAX device, GiB (same device convention as above).
HBM_GIB: dict[str, float] = {
    "tpu v4": 32.0,
    "tpu v5 lite": 16.0,
    "tpu v5e": 16.0,
    "tpu v5p": 95.0,
    "tpu v5": 95.0,
    "tpu v6 lite": 32.0,
    "tpu v6e": 32.0,
    "tpu7x": 96.0,
    "h100": 80.0,
    "h200": 141.0,
    "a100": 80.0,
}


def _lookup(table: Mapping[str, float], device_kind: str) -> float | None:
    kind = device_kind.lower()
    for key in sorted(table, key=len, reverse=True):
        if key in kind:
            return table[key]
    return None


def peak_tflops(device_kind: str | None = None, override: float = 0.0) -> float | None:
    """Peak bf16 TFLOP/s of one device (``override`` > 0 wins; None if the device is unknown)."""
    if override > 0:
        return float(override)
    return _lookup(PEAK_TFLOPS, device_kind or jax.devices()[0].device_kind)


def hbm_bytes(device_kind: str) -> float | None:
    gib = _lookup(HBM_GIB, device_kind)
    return None if gib is None else gib * 2**30


def flop_coefficients(model_cfg) -> tuple[float, float]:
    """(flops per token, flops per unit of Σ len²) of one training step (fwd + bwd), reference formula."""
    d, i, layers, v = model_cfg.hidden_size, model_cfg.intermediate_size, model_cfg.num_layers, model_cfg.vocab_size
    hq, hkv, hd = model_cfg.num_heads, model_cfg.num_kv_heads, head_dim(model_cfg)
    mlp = 3 * d * i
    attn_linear = d * (hq * hd + 2 * hkv * hd + hq * hd)
    dense = (mlp + attn_linear) * layers + 2 * v * d
    return 6.0 * dense, 12.0 * hd * hq * layers


def train_flops(model_cfg, tokens: float, sum_len_sq: float, *, causal: bool = False) -> float:
    """FLOPs of one step over ``tokens`` real tokens whose samples have Σ len² = ``sum_len_sq``."""
    per_token, per_len_sq = flop_coefficients(model_cfg)
    return per_token * tokens + per_len_sq * sum_len_sq * (0.5 if causal else 1.0)


def train_flop_terms(
    model_cfg, tokens: float, sum_len_sq: float, *, head_tokens: float | None = None, causal: bool = False
) -> dict[str, float]:
    """The formula's terms, FLOPs per step (fwd + bwd): ``layers`` (the decoder's projections and MLPs, per token),
    ``embedding`` (6·V·D per token: the reference counts the lookup as a matmul), ``lm_head`` (6·V·D per token the
    head runs on: every token, as in the reference, or ``head_tokens``, e.g. a label budget) and ``attention`` (the
    len² term). ``non_attention`` = layers + embedding + lm_head; ``matmuls`` = layers + lm_head (what a step that
    looks embeddings up does in matmuls). With ``head_tokens=None`` non_attention + attention = ``train_flops``."""
    per_token, per_len_sq = flop_coefficients(model_cfg)
    table = 6.0 * model_cfg.vocab_size * model_cfg.hidden_size
    layers = (per_token - 2 * table) * tokens
    lm_head = table * (tokens if head_tokens is None else head_tokens)
    return dict(
        layers=layers,
        embedding=table * tokens,
        lm_head=lm_head,
        attention=per_len_sq * sum_len_sq * (0.5 if causal else 1.0),
        non_attention=layers + table * tokens + lm_head,
        matmuls=layers + lm_head,
    )


def vae_encoder_flops(vae_cfg, height: int, width: int) -> float:
    """Forward FLOPs (2 · multiply-adds) of the FLUX VAE encoder (``model/vae.py`` ``Encoder``) on one
    ``height`` × ``width`` image: its 3×3 and 1×1 convolutions and the mid block's attention (q, k, v, out
    projections and the two (h·w)² matmuls). Norms and activations are not counted."""
    c, macs = vae_cfg, 0.0
    h, w, ch_in = height, width, vae_cfg.in_channels
    macs += h * w * ch_in * c.ch * 9  # conv_in
    ch = c.ch

    def resnet(h, w, cin, cout):
        return h * w * (cin * cout * 9 + cout * cout * 9 + (cin * cout if cin != cout else 0))

    for i, mult in enumerate(c.ch_mult):
        for _ in range(c.num_res_blocks):
            macs += resnet(h, w, ch, c.ch * mult)
            ch = c.ch * mult
        if i != len(c.ch_mult) - 1:
            h, w = h // 2, w // 2
            macs += h * w * ch * ch * 9  # stride-2 downsample conv
    tokens = h * w
    macs += 2 * resnet(h, w, ch, ch) + 4 * tokens * ch * ch + 2 * tokens * tokens * ch  # mid: 2 blocks + attention
    macs += h * w * ch * 2 * c.z_channels * 9  # conv_out (mean and log-variance)
    return 2.0 * macs


def tower_flop_terms(model_cfg, *, vit_patches: float, vae_images: float, image_hw: tuple[int, int], freeze=()):
    """FLOPs per step of the parts around the decoder that the reference formula leaves out: ``vit`` (SigLIP's patch
    embedding, projections and MLPs, and the connector, per patch: fwd + bwd, 6 FLOPs per weight, or forward only
    where ``train.freeze`` holds the ViT) and ``vae_encode`` (the frozen FLUX encoder's forward, ``vae_images``
    images of ``image_hw``). The ViT's attention (len² term) is not counted, like the decoder's."""
    v, d = model_cfg.vit, model_cfg.hidden_size
    vit_weights = 3 * v.patch_size**2 * v.hidden_size + v.num_layers * (
        4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size
    )
    connector = v.hidden_size * d + d * d
    vit_mult = 2.0 if "vit" in freeze else 6.0  # frozen: nothing below it trains, so no backward at all
    connector_mult = 6.0 if "connector" not in freeze else (2.0 if "vit" in freeze else 4.0)
    return dict(
        vit=(vit_mult * vit_weights + connector_mult * connector) * vit_patches,
        vae_encode=vae_images * vae_encoder_flops(model_cfg.vae, *image_hw),
    )


def packing_stats(doc) -> dict[str, jax.Array]:
    """From ``doc`` int[B, L] (0 = padding): tokens (real), sum_len_sq (Σ over samples of len², f32) and
    fill (real / all slots). Works in or out of jit."""
    doc = jnp.asarray(doc)
    counts = jax.vmap(lambda d: jnp.bincount(d, length=doc.shape[-1] + 1))(doc)[:, 1:].astype(jnp.float32)
    tokens = jnp.sum(counts)
    return dict(tokens=tokens, sum_len_sq=jnp.sum(counts * counts), fill=tokens / doc.size)


# --- aggregation over a logging window -------------------------------------------------------------

_SUMMED = ("tokens", "sum_len_sq", "nonfinite")
_LAST = ("lr", "nonfinite_steps")


def aggregate(window: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Host-side reduction of per-step metrics: sums/counts/tokens summed, lr and counters last, the rest
    averaged; every ``<name>_sum``/``<name>_count`` pair gives ``<name>`` = exact mean over the window."""
    window = [{k: np.asarray(v, np.float64) for k, v in m.items()} for m in jax.device_get(list(window))]
    if not window:
        return {}
    out = {}
    for key in window[0]:
        values = np.stack([m[key] for m in window])
        if key in _LAST:
            out[key] = float(values[-1])
        elif key in _SUMMED or key.endswith(("_sum", "_count")):
            out[key] = float(values.sum())
        else:
            out[key] = float(values.mean())
    for key in list(out):
        if key.endswith("_sum") and key[:-4] + "_count" in out:
            out[key[:-4]] = out[key] / max(out[key[:-4] + "_count"], 1.0)
    return out


def throughput(
    model_cfg, tokens: float, sum_len_sq: float, seconds: float, steps: int, num_devices: int, peak: float | None
) -> dict[str, float]:
    """tokens/s/device, TFLOP/s/device, MFU (and the causal-halved variants) over a window of ``steps``."""
    out = dict(step_time=seconds / max(steps, 1), tokens_per_sec_per_device=tokens / seconds / num_devices)
    for suffix, causal in (("", False), ("_causal", True)):
        tflops = train_flops(model_cfg, tokens, sum_len_sq, causal=causal) / seconds / num_devices / 1e12
        out["tflops_per_device" + suffix] = tflops
        if peak:
            out["mfu" + suffix] = tflops / peak
    return out


def progress_line(step: int, total: int, scalars: Mapping[str, float], seconds: float, steps: int) -> str:
    """``step 120/500 | loss 3.214 | 5,120 tokens/s | 0.84 s/step | ETA 5m19s``: the window of the last ``steps``
    steps took ``seconds``; tokens/s counts real (non-padding) tokens; the ETA assumes this window's pace."""
    seconds_per_step = seconds / max(steps, 1)
    parts = [f"step {step}/{total}"]
    if "loss" in scalars:
        parts.append(f"loss {scalars['loss']:.4g}")
    if "tokens" in scalars and seconds > 0:
        parts.append(f"{scalars['tokens'] / seconds:,.0f} tokens/s")
    parts.append(f"{seconds_per_step:.3g} s/step")
    eta = int(round(max(total - step, 0) * seconds_per_step))
    parts.append(f"ETA {eta // 3600}h{eta % 3600 // 60:02d}m" if eta >= 3600 else f"ETA {eta // 60}m{eta % 60:02d}s")
    return " | ".join(parts)


# --- writers ---------------------------------------------------------------------------------------


class JsonlWriter:
    """Appends ``{"step": s, name: value, ...}`` lines to a file (scalars and texts)."""

    def __init__(self, path: str, keep_through: int | None = None):
        """``keep_through``: drop the rows of later steps first (a resumed or rolled-back run replays them)."""
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if keep_through is not None:
            self.truncate(keep_through)
        self._f = open(path, "a", buffering=1)

    def truncate(self, step: int) -> None:
        """Rewrites the file without the rows of steps after ``step`` (atomically: write, then rename)."""
        if not os.path.exists(self.path):
            return
        with open(self.path) as fh:
            lines = fh.readlines()
        keep = [ln for ln in lines if _row_step(ln) <= step]
        if len(keep) == len(lines):
            return
        tmp = self.path + ".tmp"
        with open(tmp, "w") as fh:
            fh.writelines(keep)
        os.replace(tmp, self.path)

    def rewind(self, step: int) -> None:
        self._f.close()
        self.truncate(step)
        self._f = open(self.path, "a", buffering=1)

    def write_scalars(self, step: int, scalars: Mapping[str, float]):
        self._f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}) + "\n")

    def write_texts(self, step: int, texts: Mapping[str, str]):
        self._f.write(json.dumps({"step": int(step), **{k: str(v) for k, v in texts.items()}}) + "\n")

    def flush(self):
        self._f.flush()

    def close(self):
        self._f.close()


def _row_step(line: str) -> float:
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return float("inf")  # a torn last line (killed mid-write) goes


class MetricsLogger:
    """Buffers per-step device metrics; every ``log_every`` steps fetches them once, adds throughput/MFU
    and writes TensorBoard (``<workdir>/tensorboard``) + ``<workdir>/metrics.jsonl`` (host 0 only).

    Loop use: ``logger.step(step, metrics)`` after each train step (step = steps done), ``logger.close()``.
    Extra host-side scalars (e.g. the pipeline's skipped-sample count) go in ``step(..., extra={...})``.
    """

    def __init__(
        self,
        workdir: str,
        config,
        *,
        num_devices: int | None = None,
        total_steps: int | None = None,
        start_step: int = 0,
    ):
        """``start_step``: the step the run (re)starts from; metrics.jsonl rows of later steps are dropped, so a
        resumed run continues without duplicate steps (TensorBoard discards the orphaned later events itself)."""
        from clu import metric_writers  # imports TensorFlow: keep it lazy

        self.config = config
        self.log_every = max(int(config.train.log_every), 1)
        self.num_devices = num_devices or jax.device_count()
        self.peak = peak_tflops(override=config.train.peak_tflops)
        lead = jax.process_index() == 0
        self.writer = metric_writers.create_default_writer(
            os.path.join(workdir, "tensorboard"), just_logging=not lead, asynchronous=False
        )
        self.jsonl = JsonlWriter(os.path.join(workdir, "metrics.jsonl"), keep_through=start_step) if lead else None
        self.total_steps = int(total_steps or config.train.steps)
        self._window: list[Mapping[str, Any]] = []
        self._t0 = time.perf_counter()
        if self.peak is None:
            logging.warning("unknown device %r: set train.peak_tflops for MFU", jax.devices()[0].device_kind)

    def step(self, step: int, metrics: Mapping[str, Any], extra: Mapping[str, float] | None = None) -> dict | None:
        """Records one step's metrics; on logging steps writes and returns the aggregated scalars."""
        self._window.append(metrics)
        if step % self.log_every:
            return None
        return self.flush(step, extra)

    def flush(self, step: int, extra: Mapping[str, float] | None = None) -> dict | None:
        if not self._window:
            return None
        scalars = aggregate(self._window)
        seconds = time.perf_counter() - self._t0
        if "tokens" in scalars:
            scalars.update(
                throughput(
                    self.config.model,
                    scalars["tokens"],
                    scalars.get("sum_len_sq", 0.0),
                    seconds,
                    len(self._window),
                    self.num_devices,
                    self.peak,
                )
            )
        scalars.update(extra or {})
        self.write_scalars(step, scalars)
        logging.info("%s", progress_line(step, self.total_steps, scalars, seconds, len(self._window)))
        self._window, self._t0 = [], time.perf_counter()
        return scalars

    def rewind(self, step: int) -> None:
        """Forgets buffered metrics and drops metrics.jsonl rows after ``step`` (a rollback replays them)."""
        self._window, self._t0 = [], time.perf_counter()
        if self.jsonl:
            self.jsonl.rewind(step)

    def write_scalars(self, step: int, scalars: Mapping[str, float]):
        self.writer.write_scalars(step, scalars)
        if self.jsonl:
            self.jsonl.write_scalars(step, scalars)

    def write_images(self, step: int, images: Mapping[str, Any]):
        """images: {name: uint8/float [N, H, W, C]} (e.g. a generated grid)."""
        self.writer.write_images(step, images)

    def write_texts(self, step: int, texts: Mapping[str, str]):
        self.writer.write_texts(step, texts)
        if self.jsonl:
            self.jsonl.write_texts(step, texts)

    def close(self):
        self.writer.flush()
        self.writer.close()
        if self.jsonl:
            self.jsonl.close()
