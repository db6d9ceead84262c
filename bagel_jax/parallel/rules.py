"""The ONE table mapping logical axis names to mesh axes (``data``, ``fsdp``, ``tensor``, ``sequence``).

Parameters use the plain names; activations the ``activation_*`` names. Changing parallelism is a
config change (mesh shape); overrides of single rules go through ``config.parallel.rules_override``.
"""

from __future__ import annotations

MESH_AXES = ("data", "fsdp", "tensor", "sequence")

LOGICAL_AXIS_RULES: tuple[tuple[str, object], ...] = (
    # --- parameters ---
    ("embed", "fsdp"),  # model width (LLM hidden)
    ("mlp", "tensor"),  # SwiGLU / ViT MLP inner dim
    ("heads", "tensor"),  # q heads (in the fused [embed, heads, head_dim] kernels)
    ("kv_heads", "tensor"),  # kv heads
    ("head_dim", None),
    ("vocab", "tensor"),
    ("norm", None),  # RMSNorm / LayerNorm scales, biases of norms
    ("layers", None),  # scan-over-layers stacking axis
    ("vit_embed", "fsdp"),  # SigLIP width
    ("patch", None),  # flattened patch features (p·p·3) / latent patch features (p·p·C)
    ("pos_table", None),  # rows of fixed position tables
    ("time_freq", None),  # sinusoidal timestep features
    ("conv_in", None),  # VAE conv input channels (VAE is small and frozen: replicated)
    ("conv_out", None),
    ("conv_h", None),
    ("conv_w", None),
    ("classes", None),  # outputs of the pretraining stages' classifier heads (vit_train.py)
    ("lora_rank", None),  # LoRA adapters' rank dim (model/lora.py): A and B shard like their kernel's dims
    # --- activations ---
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", "sequence"),
    ("activation_embed", None),
    # the residual stream between decoder layers (model/mot.py CARRY_AXES): split over a tensor pair, so each chip
    # keeps half of every layer's saved input; whole again inside the layer (splitting the width everywhere
    # miscompiles on XLA: docs/DESIGN_NOTES.md 53)
    ("activation_carry_embed", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_head_dim", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("activation_patches", None),  # packed ViT patches / VAE tokens within a row
    ("activation_images", None),
    ("activation_height", None),
    ("activation_width", None),
    ("activation_channels", None),
)


def as_mesh_axes(value) -> tuple[str, ...]:
    """A rules-table value (None, one mesh axis, or a sequence of them) as a tuple of mesh axis names."""
    return () if value is None else (value,) if isinstance(value, str) else tuple(value)


def axis_rules(overrides: dict | None = None) -> tuple[tuple[str, object], ...]:
    """The rules table, with ``overrides`` ({logical name: mesh axis or None}) replacing entries."""
    if not overrides:
        return LOGICAL_AXIS_RULES
    known = {name for name, _ in LOGICAL_AXIS_RULES}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"parallel.rules_override: unknown logical axis {unknown[0]!r}")
    return tuple((name, overrides.get(name, axis)) for name, axis in LOGICAL_AXIS_RULES)
