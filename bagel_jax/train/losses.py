"""BAGEL's two losses as sums and counts, so averaging over rows, hosts and micro-batches is exact.

Reference (bagel.md §1.4 steps 8–9, §1.5):

* CE: next-token cross entropy at every slot that carries a label. Default reduction is the global
  per-token mean ``Σ ce / #label tokens``; with ``ce_loss_reweighting`` it is
  ``Σ ce·w / Σ w`` with the per-token weights ``w`` (``1/sqrt(len)`` of the text split).
  A slot carries a label iff ``batch.ce_weight > 0``.
* MSE: ``mean over the 64 latent-patch channels of (v_pred − (ε − x0))²`` per noised latent token,
  then the global per-token mean over all noised tokens.
* ``loss = ce_weight · CE + mse_weight · MSE``.

Everything here takes and returns plain arrays; ``bagel_loss_fn`` ties it to ``Bagel``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from bagel_jax.batch import KIND_NOISED_VAE, PackedBatch


def cross_entropy(logits: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
    """Per-token CE in float32: logits [..., V], labels int[...] → [...] = logsumexp − logit[label]."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return lse - picked


def ce_sum_count(ce: jnp.ndarray, ce_weight: jnp.ndarray, reweighting: bool) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Sum and count of the CE term.

    Args:
      ce: float[B, U] per-slot CE (any value where ``ce_weight == 0``; it is masked, NaN-safe).
      ce_weight: float[B, U] the batch's weights; > 0 marks a label slot.
      reweighting: False → (Σ ce over label slots, #label slots); True → (Σ ce·w, Σ w).
    """
    has_label = ce_weight > 0
    w = jnp.where(has_label, ce_weight, 0.0) if reweighting else has_label.astype(jnp.float32)
    total = jnp.sum(jnp.where(has_label, ce.astype(jnp.float32) * w, 0.0))
    return total, jnp.sum(w)


def mse_sum_count(pred: jnp.ndarray, target: jnp.ndarray, mask: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Sum over noised tokens of the channel-mean squared error, and the number of noised tokens.

    pred, target: float[B, G, C]; mask: bool[B, G] (noised latent slots).
    """
    per_token = jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)), axis=-1)
    total = jnp.sum(jnp.where(mask, per_token, 0.0))
    return total, jnp.sum(mask.astype(jnp.float32))


def total_loss(sums: dict, counts: dict, ce_weight: float = 1.0, mse_weight: float = 1.0) -> jnp.ndarray:
    """``ce_weight · sums.ce / counts.ce + mse_weight · sums.mse / counts.mse``; a term with count 0 is 0.

    ``counts`` may be larger than the batch's own (the global counts of a whole accumulated batch): each
    microbatch's loss is then its share of the whole batch's token mean, and the shares add up to it."""
    loss = jnp.zeros((), jnp.float32)
    if "ce" in sums:
        loss = loss + ce_weight * sums["ce"] / jnp.maximum(counts["ce"], 1e-12)
    if "mse" in sums:
        loss = loss + mse_weight * sums["mse"] / jnp.maximum(counts["mse"], 1e-12)
    return loss


def loss_terms(out: dict, batch: PackedBatch, *, ce_loss_reweighting: bool = False) -> tuple[dict, dict]:
    """Sums and counts of both terms from ``Bagel``'s output dict and the batch.

    Uses ``out['ce']`` [B, U] (per-slot CE; or [B, K] at the label slots with their ``out['ce_weight']``) if
    present, and ``out['velocity_pred']`` /
    ``out['velocity_target']`` [B, G, C] with ``out['mse_mask']`` [B, G] if present.
    """
    sums, counts = {}, {}
    if "ce" in out:
        weight = out.get("ce_weight", batch.ce_weight)
        sums["ce"], counts["ce"] = ce_sum_count(out["ce"], weight, ce_loss_reweighting)
    if "velocity_pred" in out:
        sums["mse"], counts["mse"] = mse_sum_count(out["velocity_pred"], out["velocity_target"], out["mse_mask"])
    return sums, counts


def loss_counts(batch: PackedBatch, *, visual_gen: bool = True, ce_loss_reweighting: bool = False) -> dict:
    """The normalisers of both terms from the batch alone (no forward pass): {'ce': #label slots (or Σ weights
    with ``ce_loss_reweighting``), 'mse': #noised latent slots}, f32 scalars summed over every row of ``batch``
    (under jit over a sharded batch: the sum over all data-parallel shards). Equal to the counts ``loss_terms``
    returns for the same batch."""
    _, ce = ce_sum_count(jnp.zeros(batch.ce_weight.shape, jnp.float32), batch.ce_weight, ce_loss_reweighting)
    counts = {"ce": ce}
    if visual_gen and batch.gen_len > 0:
        counts["mse"] = jnp.sum((batch.kind[:, batch.und_len :] == KIND_NOISED_VAE).astype(jnp.float32))
    return counts


def bagel_loss_fn(
    model,
    params,
    batch: PackedBatch,
    rng,
    *,
    counts: dict | None = None,
    ce_weight: float = 1.0,
    mse_weight: float = 1.0,
    ce_loss_reweighting: bool = False,
    **apply_kwargs,
) -> tuple[jnp.ndarray, dict]:
    """The training objective of one (micro-)batch.

    Args:
      model: a ``bagel_jax.model.bagel.Bagel``.
      params: its ``params`` collection (the frozen VAE lives under ``params['vae']`` and receives
        zero gradient: ``Bagel`` stops gradients into it).
      batch: a ``PackedBatch`` of arrays.
      rng: PRNG key for the VAE posterior sample and the flow noise.
      counts: the normalisers of a whole accumulated batch (``loss_counts`` of it), or None for this batch's own.
      apply_kwargs: passed to ``Bagel.__call__`` (e.g. ``noise=`` to fix the draws).

    Returns:
      (loss, aux): loss = ce_weight·CE + mse_weight·MSE of this batch; aux = {'ce_sum', 'ce_count',
      'mse_sum', 'mse_count'} (additive over rows: a trainer re-averages exactly across micro-batches
      and hosts; ``train/step.py`` reports ``<name> = <name>_sum / <name>_count``).
    """
    if "vae" in params:  # frozen: no tangents through the encoder, so no residuals are kept for it
        params = {**params, "vae": jax.lax.stop_gradient(params["vae"])}
    out = model.apply({"params": params}, batch, rng, **apply_kwargs)
    sums, own_counts = loss_terms(out, batch, ce_loss_reweighting=ce_loss_reweighting)
    loss = total_loss(sums, own_counts if counts is None else counts, ce_weight, mse_weight)
    aux = {}
    for name in sums:
        aux[f"{name}_sum"] = sums[name]
        aux[f"{name}_count"] = own_counts[name]
    return loss, aux


def make_loss_fn(model, config) -> Callable[[Any, PackedBatch, Any], tuple[jnp.ndarray, dict]]:
    """``loss_fn(params, batch, rng) -> (loss, aux)`` for the trainer, weights taken from the full config."""

    def loss_fn(params, batch, rng, counts=None):
        return bagel_loss_fn(
            model,
            params,
            batch,
            rng,
            counts=counts,
            ce_weight=config.train.ce_weight,
            mse_weight=config.train.mse_weight,
            ce_loss_reweighting=config.data.ce_loss_reweighting,
        )

    return loss_fn


def make_loss_counts(config) -> Callable[[PackedBatch], dict]:
    """``batch -> loss_counts(batch)`` for the trainer's unbiased gradient accumulation (``train/step.py``)."""

    def counts(batch):
        return loss_counts(
            batch, visual_gen=config.model.visual_gen, ce_loss_reweighting=config.data.ce_loss_reweighting
        )

    return counts
