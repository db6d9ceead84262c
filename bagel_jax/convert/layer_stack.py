"""Scan-over-layers param layout: ``layers_0..layers_{n-1}`` subtrees ⇄ one ``layers`` subtree with a leading [n]
axis (``nn.scan`` form), and which subtrees of a ``Bagel`` param tree are stacked for a config."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np


class ConversionError(ValueError):
    """A state dict or param tree that does not match the config; the message names the key."""


def stack_layers(tree: Mapping, num_layers: int) -> dict:
    """``layers_0..layers_{n-1}`` subtrees → one ``layers`` subtree with a leading [n] axis (scan form)."""
    names = [f"layers_{i}" for i in range(num_layers)]
    missing = [n for n in names if n not in tree]
    if missing:
        raise ConversionError(f"{missing[0]}: missing layer subtree (stacking {num_layers} layers)")
    out = {k: v for k, v in tree.items() if k not in names}
    out["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *[tree[n] for n in names])
    return out


def unstack_layers(tree: Mapping) -> dict:
    """Inverse of ``stack_layers``."""
    stacked = tree["layers"]
    n = jax.tree.leaves(stacked)[0].shape[0]
    out = {k: v for k, v in tree.items() if k != "layers"}
    for i in range(n):
        out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return out


def scanned_stacks(cfg) -> dict[str, int]:
    """{top-level subtree: number of layers} of the layer stacks a ``model`` config scans: ``language_model``
    (``model.scan_layers``) and ``vit_model`` (``model.vit.scan_layers``, when ``visual_und``)."""
    out = {}
    if cfg.scan_layers:
        out["language_model"] = cfg.num_layers
    if cfg.get("visual_und", True) and cfg.vit.get("scan_layers", False):
        out["vit_model"] = cfg.vit.num_layers
    return out
