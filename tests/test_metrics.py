"""FLOPs (BAGEL's formula vs a hand computation), MFU, packing stats, aggregation, writers."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bagel_jax.config import base_config
from bagel_jax.train import metrics


def _tiny_model():
    m = base_config().model
    m.update(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=512)
    return m


def test_flops_match_hand_computation():
    # D=64, I=128, L=2, V=512, Hq=4, Hkv=2, hd=16 (by hand):
    #   mlp = 3·64·128 = 24576;  attn_linear = 64·(4·16 + 2·2·16 + 4·16) = 64·192 = 12288
    #   N = (24576 + 12288)·2 + 2·512·64 = 73728 + 65536 = 139264  →  6N = 835584 FLOPs per token
    #   attention: 12·hd·Hq·L = 12·16·4·2 = 1536 per unit of Σ len²
    per_token, per_len_sq = metrics.flop_coefficients(_tiny_model())
    assert per_token == 835584 and per_len_sq == 1536
    # two rows: samples of 100 + 28 tokens and one of 64 → 192 tokens, Σ len² = 10000 + 784 + 4096 = 14880
    assert metrics.train_flops(_tiny_model(), 192, 14880) == 835584 * 192 + 1536 * 14880
    assert metrics.train_flops(_tiny_model(), 192, 14880, causal=True) == 835584 * 192 + 768 * 14880
    # the terms: layers 6·73728, embedding and LM head 6·512·64 each per token; the head on 40 label slots only
    t = metrics.train_flop_terms(_tiny_model(), 192, 14880, head_tokens=40)
    assert t["layers"] == 6 * 73728 * 192 and t["embedding"] == 6 * 32768 * 192 and t["lm_head"] == 6 * 32768 * 40
    assert t["matmuls"] == t["layers"] + t["lm_head"] and t["attention"] == 1536 * 14880
    full = metrics.train_flop_terms(_tiny_model(), 192, 14880)
    assert full["non_attention"] + full["attention"] == metrics.train_flops(_tiny_model(), 192, 14880)


def test_flops_of_the_7b_release_use_7_6b_active_params():
    per_token, per_len_sq = metrics.flop_coefficients(base_config().model)
    # Qwen2.5-7B: 28 layers of 3·3584·18944 + 3584·(2·3584 + 2·512), plus embed and lm_head 2·152064·3584
    n = 28 * (3 * 3584 * 18944 + 3584 * (2 * 3584 + 2 * 512)) + 2 * 152064 * 3584
    assert per_token == 6 * n and abs(n - 7.62e9) / 7.62e9 < 5e-3  # bagel.md: "dense LM 7.62B"
    assert per_len_sq == 12 * 128 * 28 * 28


def test_packing_stats_match_numpy():
    rng = np.random.default_rng(0)
    doc = np.sort(rng.integers(0, 5, size=(3, 40)), axis=1).astype(np.int32)
    doc[1] = 0  # an empty row
    stats = jax.jit(metrics.packing_stats)(doc)
    tokens = sum(int((row > 0).sum()) for row in doc)
    len_sq = sum(int((row == d).sum()) ** 2 for row in doc for d in range(1, 5))
    assert float(stats["tokens"]) == tokens and float(stats["sum_len_sq"]) == len_sq
    np.testing.assert_allclose(float(stats["fill"]), tokens / doc.size)


@pytest.mark.parametrize(
    "kind,peak",
    [
        ("TPU v4", 275.0),
        ("TPU v5 lite", 197.0),
        ("TPU v5", 459.0),
        ("TPU v6 lite", 918.0),
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("cpu", None),
    ],
)
def test_peak_table(kind, peak):
    assert metrics.peak_tflops(kind) == peak
    assert metrics.peak_tflops(kind, override=123.0) == 123.0


def test_aggregate_and_throughput():
    window = [
        dict(
            loss=jnp.float32(2.0),
            ce_sum=jnp.float32(10.0),
            ce_count=jnp.float32(4.0),
            lr=jnp.float32(0.1),
            tokens=jnp.float32(100.0),
            sum_len_sq=jnp.float32(5000.0),
            nonfinite=jnp.int32(0),
            nonfinite_steps=jnp.int32(1),
            ce=jnp.float32(2.5),
        ),
        dict(
            loss=jnp.float32(4.0),
            ce_sum=jnp.float32(2.0),
            ce_count=jnp.float32(2.0),
            lr=jnp.float32(0.2),
            tokens=jnp.float32(50.0),
            sum_len_sq=jnp.float32(2500.0),
            nonfinite=jnp.int32(1),
            nonfinite_steps=jnp.int32(2),
            ce=jnp.float32(1.0),
        ),
    ]
    agg = metrics.aggregate(window)
    assert agg["loss"] == 3.0 and agg["lr"] == pytest.approx(0.2) and agg["nonfinite_steps"] == 2
    assert agg["ce_sum"] == 12.0 and agg["ce_count"] == 6.0 and agg["ce"] == 2.0  # exact token mean, not 1.75
    assert agg["tokens"] == 150.0 and agg["nonfinite"] == 1.0
    model = _tiny_model()
    t = metrics.throughput(model, agg["tokens"], agg["sum_len_sq"], seconds=3.0, steps=2, num_devices=4, peak=100.0)
    flops = 835584 * 150 + 1536 * 7500
    assert t["step_time"] == 1.5 and t["tokens_per_sec_per_device"] == 150 / 3 / 4
    assert t["tflops_per_device"] == pytest.approx(flops / 3 / 4 / 1e12)
    assert t["mfu"] == pytest.approx(flops / 3 / 4 / 1e12 / 100.0)
    assert t["mfu_causal"] == pytest.approx((835584 * 150 + 768 * 7500) / 3 / 4 / 1e12 / 100.0)


def test_metrics_logger_writes_tensorboard_and_jsonl(tmp_path):
    config = base_config()
    config.model.update(_tiny_model())
    config.train.update(log_every=2, peak_tflops=10.0, steps=4)
    logger = metrics.MetricsLogger(str(tmp_path), config, num_devices=1)
    step = dict(
        loss=jnp.float32(1.0),
        tokens=jnp.float32(64.0),
        sum_len_sq=jnp.float32(4096.0),
        fill=jnp.float32(0.5),
        lr=jnp.float32(1e-3),
    )
    assert logger.step(1, step) is None
    out = logger.step(2, step, extra={"skipped_samples": 3.0})
    logger.write_texts(2, {"answer": "a red square"})
    logger.close()
    assert out["tokens"] == 128.0 and out["mfu"] > 0 and out["skipped_samples"] == 3.0
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert lines[0]["step"] == 2 and lines[0]["mfu"] == pytest.approx(out["mfu"]) and lines[1]["answer"]
    events = os.listdir(tmp_path / "tensorboard")
    assert any(name.startswith("events.out.tfevents") for name in events)


def test_vae_encoder_flops_equal_xla_count_of_the_encoder():
    """The formula's VAE encoder term against XLA's cost analysis of ``model/vae.py``'s Encoder (no loops), f32."""
    import ml_collections

    from bagel_jax.model.vae import Encoder

    cfg = ml_collections.ConfigDict(
        dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4, in_channels=3, out_ch=3, dtype="float32")
    )
    encoder, x = Encoder(cfg), jnp.zeros((2, 32, 48, 3), jnp.float32)
    params = jax.eval_shape(encoder.init, jax.random.PRNGKey(0), x)
    cost = jax.jit(encoder.apply).lower(params, x).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    formula = x.shape[0] * metrics.vae_encoder_flops(cfg, 32, 48)
    # XLA skips the products with a 'SAME' conv's zero padding (~3% of them at these small sizes) and adds norms and
    # activations; a wrong level, channel count or block in the formula is off by far more
    assert 0.93 * formula <= cost["flops"] <= 1.07 * formula, (cost["flops"], formula)
