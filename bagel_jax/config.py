"""The config schema: ``base_config()`` lists every key with its default and type; ``validate`` checks
a user config against it *before* anything is built, raising ``ConfigError`` with one line that names
the key. ``configs/*.py`` start from ``base_config()`` and override values.
"""
from __future__ import annotations

from typing import Any, Callable

import ml_collections


class ConfigError(ValueError):
    """A bad config value; the message is one line and starts with the dotted key."""


# model.remat mode -> name of the jax.checkpoint_policies policy of each remat'ed layer (None: save nothing);
# "none" means no remat. bagel_jax.model.remat applies it.
REMAT_POLICIES = {"full": None, "dots": "dots_with_no_batch_dims_saveable"}


def _model() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        # Qwen2 MoT LLM
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
        num_kv_heads=4, head_dim=0,  # 0 = hidden_size // num_heads
        rope_theta=1_000_000.0, rms_norm_eps=1e-6, qk_norm=True, qkv_bias=True, tie_word_embeddings=False,
        layer_module="mot",  # "mot" (two experts per layer) | "dense" (one expert, plain Qwen2)
        dtype="bfloat16", param_dtype="float32",
        attention_impl="auto",  # reference | tpu | gpu | auto
        attention_block_q=512, attention_block_kv=512,
        remat="none",  # none | full | dots (jax.checkpoint policy for each decoder layer)
        scan_layers=False,
        # Bagel assembly
        visual_gen=True, visual_und=True, latent_patch_size=2, max_latent_size=64,
        vit_max_num_patch_per_side=70, connector_act="gelu_pytorch_tanh", interpolate_pos=False,
        timestep_shift=1.0,
        vit=ml_collections.ConfigDict(dict(
            hidden_size=1152, intermediate_size=4304, num_layers=26, num_heads=16, patch_size=14,
            layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh", num_positions=4900,
            # a ViT-stage workdir (bagel_jax/train/vit_train.py), its export/, or any transformers SigLIP vision
            # checkpoint (dir or .safetensors): a fresh run loads params['vit_model'] from it
            init_from="")),
        vae=ml_collections.ConfigDict(dict(
            ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=16, in_channels=3, out_ch=3,
            scale_factor=0.3611, shift_factor=0.1159, dtype="bfloat16",
            # a VAE-stage workdir (bagel_jax/train/vae_train.py) or its export/ae.safetensors: a fresh run loads
            # params['vae'] from it, and its vae.json sets scale_factor / shift_factor
            init_from="",
            # encode a row's image slots one after another (scan): per-chip VAE activations of one image per row
            # instead of max_vae_images (what lets 12 × 1024² images per row fit; slower for tiny images)
            encode_scan=False)),
    ))


def _data() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        seq_len=32768, und_len=24576, gen_len=8192, max_vit_patches=16384, max_vae_images=8,
        vae_image_size=(1024, 1024),  # static (H, W) pad size for VAE images; multiples of 16
        batch_size=8,  # global rows per step
        data_dir="", builder="synthetic_shapes", tokenizer="", seed=42,
        mixture=ml_collections.ConfigDict(dict(t2i=1.0, vlm=1.0, edit=1.0, video=0.0, web=0.0)),
        vit_transform=(980, 224, 14), vae_transform=(1024, 512, 16),  # (max side, min side, stride)
        text_cond_dropout_prob=0.1, vit_cond_dropout_prob=0.3, vae_cond_dropout_prob=0.3,
        ce_loss_reweighting=False, num_workers=2, prefetch=2, shuffle=True,
        # where each mixture kind reads from: "name[/config][:split]" under data_dir; "" = f"{builder}:{kind}"
        sources=ml_collections.ConfigDict(dict(t2i="", vlm="", edit="", video="", web="")),
        max_docs_per_row=256,  # documents per row (static size of the per-row record ids)
        pack_buffer=64,  # documents the packer holds to choose from when filling a row
        max_input_pixels=200_000_000,  # larger decoded images are skipped as too_large
        # per-kind ViT resize rule, () = data.vit_transform (the reference's yaml: edit (518, 224, 14),
        # vlm (980, 378, 14, 2_007_040))
        vit_transform_by_kind=ml_collections.ConfigDict(dict(t2i=(), vlm=(), edit=(), video=(), web=())),
        # dtype of vae_images / vit_patches: "float32" in [-1, 1] (PackedBatch contract) or "uint8" in [0, 255]
        # (4x fewer host bytes; the model then normalises x / 127.5 - 1 and zeroes VAE padding using vae_hw)
        pixel_dtype="float32",
        emulate_hosts=1,  # > 1: one process reads as this many hosts (reproduces a multi-host data stream)
        synthetic_examples=0,  # > 0: the trainer builds synthetic_shapes (this many per split) if data_dir lacks it
        synthetic_square=False,  # the synthetic_shapes images are square (width = height)
    ))


def _train() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        steps=500_000, seed=4396, lr=1e-4, min_lr=1e-7, warmup_steps=2000, schedule="constant",
        beta1=0.9, beta2=0.95, eps=1e-15, weight_decay=0.0, max_grad_norm=1.0, ema_decay=0.9999,
        ce_weight=1.0, mse_weight=1.0, grad_accum_steps=1,
        freeze=(),  # subset of ("vit", "connector", "und", "gen", "llm"); the VAE is always frozen
        nonfinite="skip",  # skip | halt: what a step with NaN/inf gradients does
        log_every=10, checkpoint_every=2000, keep_checkpoints=3, init_from="",
        eval_every=0, peak_tflops=0.0,
        # every sample_every steps (0 = never): EMA-model images for sample_prompts (sample_steps Euler steps)
        # and its answer to sample_question about the first image, written to TensorBoard
        sample_every=0, sample_prompts=("a red circle",), sample_question="", sample_steps=20,
    ))


def _parallel() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        data=-1, fsdp=1, tensor=1, sequence=1,  # -1 fills with the remaining devices
        dcn_data=1, dcn_fsdp=1,  # multi-slice (DCN) sizes
        rules_override=ml_collections.ConfigDict(),
    ))


def _vae_stage() -> ml_collections.ConfigDict:
    """Keys read only by the VAE stage (bagel_jax/train/vae_train.py, configs/tiny_vae.py)."""
    return ml_collections.ConfigDict(dict(
        loss="l2",  # l2 | l1: the reconstruction term
        kl_weight=1e-6,  # on the per-latent-element mean KL
        eval_every=250,  # steps between held-out PSNR evals (0 = only at the end)
        eval_images=64, eval_seed=1042, eval_batch=16,  # held-out images from the shapes generator with eval_seed
        stats_images=256,  # training images for the latent mean/std (scale_factor / shift_factor)
        export="params",  # params | ema: which weights go to <workdir>/export
    ))


def _vit_stage() -> ml_collections.ConfigDict:
    """Keys read only by the ViT stage (bagel_jax/train/vit_train.py, configs/tiny_vit.py)."""
    return ml_collections.ConfigDict(dict(
        eval_every=250,  # steps between held-out evals (0 = only at the end)
        eval_images=256, eval_seed=1042, eval_batch=64,  # held-out scenes from the shapes generator with eval_seed
        export="params",  # params | ema: which weights go to <workdir>/export
    ))


def base_config() -> ml_collections.ConfigDict:
    """Every key the project knows, with release-like defaults (BAGEL-7B-MoT)."""
    return ml_collections.ConfigDict(dict(
        model=_model(), data=_data(), train=_train(), parallel=_parallel(),
        evals=ml_collections.ConfigDict(), name="bagel", vae_stage=_vae_stage(), vit_stage=_vit_stage(),
    ))


# --- validation ------------------------------------------------------------------------------------

CHOICES = {
    "model.layer_module": ("mot", "dense"), "model.dtype": ("float32", "bfloat16"),
    "model.param_dtype": ("float32", "bfloat16"), "model.attention_impl": ("reference", "tpu", "gpu", "auto"),
    "model.remat": ("none", *REMAT_POLICIES), "model.vae.dtype": ("float32", "bfloat16"),
    "model.connector_act": ("gelu_pytorch_tanh", "gelu", "silu"),
    "model.vit.hidden_act": ("gelu_pytorch_tanh", "gelu"),
    "train.schedule": ("constant", "cosine"), "train.nonfinite": ("skip", "halt"),
    "data.pixel_dtype": ("float32", "uint8"),
}
FREEZABLE = ("vit", "connector", "und", "gen", "llm")
FREE_FORM = ("evals", "parallel.rules_override")  # sections whose keys are not fixed by the schema


def _flatten(cfg, prefix=""):
    for key, value in cfg.items():
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict) and path not in FREE_FORM:
            yield from _flatten(value, path + ".")
        else:
            yield path, value


def _type_ok(default, value) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, (tuple, list)):
        return isinstance(value, (tuple, list))
    return isinstance(value, type(default))


def _check(cond: bool, key: str, msg: str):
    if not cond:
        raise ConfigError(f"{key}: {msg}")


_RULES: list[Callable[[Any], None]] = []


def rule(fn):
    _RULES.append(fn)
    return fn


@rule
def _model_shapes(c):
    m = c.model
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
        _check(m[k] > 0, f"model.{k}", f"must be > 0, got {m[k]}")
    if m.head_dim == 0:
        _check(m.hidden_size % m.num_heads == 0, "model.num_heads",
               f"{m.num_heads} heads do not divide hidden_size {m.hidden_size}")
    _check(m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads",
           f"{m.num_kv_heads} kv heads do not divide num_heads {m.num_heads}")
    v = m.vit
    _check(v.hidden_size % v.num_heads == 0, "model.vit.num_heads",
           f"{v.num_heads} heads do not divide vit.hidden_size {v.hidden_size}")
    _check(v.num_positions >= m.vit_max_num_patch_per_side ** 2, "model.vit.num_positions",
           f"{v.num_positions} < vit_max_num_patch_per_side² = {m.vit_max_num_patch_per_side ** 2}")
    _check(m.vae.ch % 32 == 0, "model.vae.ch", f"must be a multiple of 32 (GroupNorm groups), got {m.vae.ch}")
    _check(m.timestep_shift > 0, "model.timestep_shift", f"must be > 0, got {m.timestep_shift}")


@rule
def _budgets(c):
    d = c.data
    _check(d.und_len + d.gen_len == d.seq_len, "data.seq_len",
           f"und_len {d.und_len} + gen_len {d.gen_len} != seq_len {d.seq_len}")
    for k in ("seq_len", "und_len", "batch_size", "max_vae_images", "max_vit_patches"):
        _check(d[k] > 0, f"data.{k}", f"must be > 0, got {d[k]}")
    _check(d.gen_len >= 0, "data.gen_len", f"must be >= 0, got {d.gen_len}")
    h, w = d.vae_image_size
    stride = 8 * c.model.latent_patch_size
    _check(h % stride == 0 and w % stride == 0 and h > 0 and w > 0, "data.vae_image_size",
           f"{(h, w)} must be positive multiples of {stride}")
    _check(max(h, w) // stride <= c.model.max_latent_size, "data.vae_image_size",
           f"{(h, w)} has more than max_latent_size={c.model.max_latent_size} latent tokens per side")
    for k in ("text_cond_dropout_prob", "vit_cond_dropout_prob", "vae_cond_dropout_prob"):
        _check(0.0 <= d[k] <= 1.0, f"data.{k}", f"must be in [0, 1], got {d[k]}")
    for k, wgt in d.mixture.items():
        _check(wgt >= 0, f"data.mixture.{k}", f"weight must be >= 0, got {wgt}")
    _check(sum(d.mixture.values()) > 0, "data.mixture", "all weights are 0")


@rule
def _data_transforms(c):
    d, m = c.data, c.model
    specs = [("vit_transform", d.vit_transform, m.vit.patch_size),
             ("vae_transform", d.vae_transform, 8 * m.latent_patch_size)]
    specs += [(f"vit_transform_by_kind.{k}", v, m.vit.patch_size) for k, v in d.vit_transform_by_kind.items() if v]
    for key, spec, stride in specs:
        spec = tuple(spec)
        _check(len(spec) in (3, 4) and all(isinstance(v, int) and v > 0 for v in spec), f"data.{key}",
               f"must be (max_size, min_size, stride[, max_pixels]) positive ints, got {spec}")
        _check(spec[2] == stride, f"data.{key}", f"stride {spec[2]} must equal {stride}")
        _check(spec[1] <= spec[0], f"data.{key}", f"min_size {spec[1]} > max_size {spec[0]}")
    for key, spec, _ in specs[:1] + specs[2:]:
        vit_side = spec[0] // m.vit.patch_size
        _check(vit_side <= m.vit_max_num_patch_per_side, f"data.{key}",
               f"max_size {spec[0]} gives {vit_side} patches per side > "
               f"model.vit_max_num_patch_per_side={m.vit_max_num_patch_per_side}")
    _check(d.vae_transform[0] <= min(d.vae_image_size), "data.vae_transform",
           f"max_size {d.vae_transform[0]} exceeds data.vae_image_size {tuple(d.vae_image_size)}")
    _check(d.max_vit_patches <= d.und_len, "data.max_vit_patches",
           f"{d.max_vit_patches} > und_len {d.und_len} (every patch takes an und slot)")
    _check(d.max_docs_per_row >= 1, "data.max_docs_per_row", f"must be >= 1, got {d.max_docs_per_row}")
    _check(d.pack_buffer >= 1, "data.pack_buffer", f"must be >= 1, got {d.pack_buffer}")
    _check(d.emulate_hosts >= 1 and d.batch_size % d.emulate_hosts == 0, "data.emulate_hosts",
           f"must be >= 1 and divide batch_size {d.batch_size}, got {d.emulate_hosts}")


@rule
def _training(c):
    t = c.train
    _check(t.lr >= 0, "train.lr", f"must be >= 0, got {t.lr}")
    _check(0.0 <= t.ema_decay <= 1.0, "train.ema_decay", f"must be in [0, 1], got {t.ema_decay}")
    _check(t.grad_accum_steps >= 1, "train.grad_accum_steps", f"must be >= 1, got {t.grad_accum_steps}")
    _check(t.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {t.warmup_steps}")
    for name in t.freeze:
        _check(name in FREEZABLE, "train.freeze", f"unknown module {name!r} (freezable: {', '.join(FREEZABLE)})")


@rule
def _mesh(c):
    p = c.parallel
    sizes = [p.data, p.fsdp, p.tensor, p.sequence]
    for name, s in zip(("data", "fsdp", "tensor", "sequence"), sizes):
        _check(s == -1 or s >= 1, f"parallel.{name}", f"must be >= 1 or -1 (fill), got {s}")
    _check(sizes.count(-1) <= 1, "parallel", "at most one mesh axis may be -1")
    _check(c.model.num_kv_heads % p.tensor == 0 or p.tensor == -1, "parallel.tensor",
           f"tensor={p.tensor} does not divide model.num_kv_heads={c.model.num_kv_heads}")


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> ml_collections.ConfigDict:
    """Checks ``config`` against the schema; raises ``ConfigError`` naming the first bad key.

    ``num_devices`` (optional) also checks the mesh and the batch against the device count.
    """
    schema = dict(_flatten(base_config()))
    for key, value in _flatten(config):
        if key not in schema:
            raise ConfigError(f"{key}: unknown config key")
        default = schema[key]
        if not _type_ok(default, value):
            raise ConfigError(f"{key}: expected {type(default).__name__}, got {type(value).__name__} {value!r}")
        if key in CHOICES and value not in CHOICES[key]:
            raise ConfigError(f"{key}: must be one of {CHOICES[key]}, got {value!r}")
    for key in schema:
        if not _has(config, key):
            raise ConfigError(f"{key}: missing (start configs from bagel_jax.config.base_config())")
    for fn in _RULES:
        fn(config)
    if num_devices is not None:
        check_devices(config, num_devices)
    return config


def check_devices(config, num_devices: int) -> tuple[int, int, int, int]:
    """Resolves -1 in the mesh and checks it and the batch against ``num_devices``; returns sizes."""
    p = config.parallel
    sizes = [p.data, p.fsdp, p.tensor, p.sequence]
    fixed = 1
    for s in sizes:
        fixed *= s if s != -1 else 1
    if -1 in sizes:
        _check(num_devices % fixed == 0, "parallel", f"mesh axes {sizes} do not divide {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // fixed
    total = sizes[0] * sizes[1] * sizes[2] * sizes[3]
    _check(total == num_devices, "parallel", f"mesh {dict(zip(('data', 'fsdp', 'tensor', 'sequence'), sizes))} "
           f"has {total} devices, but {num_devices} are present")
    batch_shards = sizes[0] * sizes[1]
    _check(config.data.batch_size % batch_shards == 0, "data.batch_size",
           f"{config.data.batch_size} rows not divisible by data×fsdp = {batch_shards}")
    return tuple(sizes)


def _has(config, dotted: str) -> bool:
    node = config
    for part in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return False
        node = node[part]
    return True


def head_dim(model_cfg) -> int:
    return model_cfg.head_dim or model_cfg.hidden_size // model_cfg.num_heads
