"""The ViT over the used prefix of a row's patch slots (``model.vit_patches``), not over every slot.

A row's ``max_vit_patches`` slots (P) are a static cap sized for the fullest row, and the packer fills them from the
front (batch.py): a 4K row of the t2i / vlm / edit mix uses 300–420 of its 3584 slots, so a ViT over every slot
did ~9× the work. ``on_used_prefix`` runs the ViT on the shortest of a few static prefixes (P, P/2, P/4, … rounded
up to ``multiple``) that holds every row's last real patch, chosen per batch with ``lax.switch`` (one compiled
branch per size, no recompiles), and pads the output back to [B, P, D] with zeros. Each real patch's output is
the same as over all P slots: NaViT attention stays within an image, and every image lies inside the prefix.
Padding slots' outputs differ (zeros here, finite values there); callers drop them (``vit_slot`` = U).

``all`` (every slot) is the oracle; ``auto`` is ``used`` on CPU and ``all`` elsewhere, where P is sharded over the
sequence and a dynamic prefix would not keep its sharding.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

MODES = ("auto", "all", "used")


def resolve_vit_patches(mode: str) -> str:
    """``model.vit_patches`` with ``auto`` resolved for this process's backend: ``"all"`` or ``"used"``."""
    if mode not in MODES:
        raise ValueError(f"model.vit_patches: unknown mode {mode!r} (one of {', '.join(MODES)})")
    if mode == "auto":
        return "used" if jax.default_backend() == "cpu" else "all"
    return mode


def prefix_sizes(slots: int, branches: int = 4, multiple: int = 32) -> tuple[int, ...]:
    """Ascending distinct prefix lengths: ``slots`` halved ``branches - 1`` times, each rounded up to ``multiple``
    (≤ ``slots``); the last is always ``slots``."""
    sizes = {min(slots, multiple * math.ceil(slots / 2**k / multiple)) for k in range(max(branches, 1))}
    return tuple(sorted(sizes))


def used_patch_slots(image_ids):
    """int32 scalar: one past the last slot any row uses (image id > 0), 0 when no row has a patch."""
    slots = image_ids.shape[-1]
    positions = jnp.arange(1, slots + 1, dtype=jnp.int32)
    return jnp.max(jnp.where(image_ids > 0, positions, 0))


def on_used_prefix(vit_fn, params, patches, pos_ids, image_ids, branches: int = 4, multiple: int = 32):
    """``vit_fn(params, patches, pos_ids, image_ids) -> [B, n, D]`` on the shortest ``prefix_sizes`` prefix holding
    every used slot, zero-padded back to [B, P, D]. params: any pytree (differentiated); patches [B, P, F] (also
    differentiated), pos_ids / image_ids int[B, P].

    The gradient recomputes the chosen branch's forward (custom VJP, residuals = the inputs): differentiating a
    ``switch`` directly makes its forward emit every branch's activations, zero-filled for the branches not taken,
    which cost more than the ViT itself (a 4K row: ~37 ms a step, docs/EXPERIMENTS.md)."""
    slots = patches.shape[1]
    sizes = prefix_sizes(slots, branches, multiple)
    if len(sizes) == 1:
        return vit_fn(params, patches, pos_ids, image_ids)
    index = jnp.sum(jnp.asarray(sizes[:-1], jnp.int32) < used_patch_slots(image_ids))

    def run(n):
        def branch(params, patches, pos_ids, image_ids):
            out = vit_fn(params, patches[:, :n], pos_ids[:, :n], image_ids[:, :n])
            return jnp.pad(out, ((0, 0), (0, slots - n), (0, 0)))

        return branch

    runs = [run(n) for n in sizes]

    def grad_of(branch):
        def grads(params, patches, pos_ids, image_ids, g):
            _, vjp = jax.vjp(lambda p, x: branch(p, x, pos_ids, image_ids), params, patches)
            return vjp(g)

        return grads

    @jax.custom_vjp
    def switch(index, params, patches, pos_ids, image_ids):
        return jax.lax.switch(index, runs, params, patches, pos_ids, image_ids)

    def switch_fwd(index, params, patches, pos_ids, image_ids):
        return switch(index, params, patches, pos_ids, image_ids), (index, params, patches, pos_ids, image_ids)

    def switch_bwd(res, g):
        index, params, patches, pos_ids, image_ids = res
        d_params, d_patches = jax.lax.switch(index, [grad_of(r) for r in runs], params, patches, pos_ids, image_ids, g)
        return None, d_params, d_patches, None, None

    switch.defvjp(switch_fwd, switch_bwd)
    return switch(index, params, patches, pos_ids, image_ids)
