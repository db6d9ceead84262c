"""The config schema: ``base_config()`` lists every key with its default and type; ``validate`` checks
a user config against it *before* anything is built, raising ``ConfigError`` with one line that names
the key. ``configs/*.py`` start from ``base_config()`` and override values.
"""

from __future__ import annotations

import difflib
import math
import os
import tempfile
from collections.abc import Callable
from typing import Any

import ml_collections


class ConfigError(ValueError):
    """A bad config value; the message is one line and starts with the dotted key."""


# model.remat mode -> (policy, checkpoint names) of each remat'ed layer (decoder and SigLIP); "none" means no remat.
# bagel_jax.model.remat builds the jax.checkpoint policy. Names tagged in the layers: "query", "key", "value" (the
# attention's inputs, after QK-norm and RoPE), "attention_out" (the attention's output, before o_proj) and
# "layer_input" (a decoder layer's input: what a scanned full-remat stack keeps per layer).
#   full: save nothing (recompute the whole layer, attention included); dots: save matmul outputs without batch dims;
#   save_*: save only the named tensors; offload_*: move the named tensors to pinned host memory in the forward pass
#   and back for the backward pass (TPU, GPU and CPU have it), saving nothing else on the device.
_QKV = ("query", "key", "value")
REMAT_POLICIES = {
    "full": ("nothing_saveable", ()),
    "dots": ("dots_with_no_batch_dims_saveable", ()),
    "save_qkv": ("save_names", _QKV),
    "save_attn": ("save_names", ("attention_out",)),
    "save_qkv_attn": ("save_names", (*_QKV, "attention_out")),
    "offload_attn": ("offload_names", ("attention_out",)),
    "offload_qkv_attn": ("offload_names", (*_QKV, "attention_out")),
    "offload_input": ("offload_names", ("layer_input",)),
}


def _model() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            # Qwen2 MoT LLM
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_layers=28,
            num_heads=28,
            num_kv_heads=4,
            head_dim=0,  # 0 = hidden_size // num_heads
            rope_theta=1_000_000.0,
            rms_norm_eps=1e-6,
            qk_norm=True,
            qkv_bias=True,
            tie_word_embeddings=False,
            layer_module="mot",  # "mot" (two experts per layer) | "dense" (one expert, plain Qwen2)
            dtype="bfloat16",
            param_dtype="float32",
            attention_impl="auto",  # reference | tpu | gpu | auto
            attention_block_q=512,
            attention_block_kv=512,
            mlp_tokens="auto",  # auto | batched | flat: MLPs on [B, T, D] or [B·T, D] (auto: flat on CPU; same result)
            vit_patches="auto",  # auto | all | used: the ViT on every patch slot or the used prefix (auto: CPU used)
            remat="none",  # none | full | dots | save_* | offload_* (REMAT_POLICIES: each decoder and SigLIP layer)
            scan_layers=False,
            ce_chunk=4096,  # label (or und) slots per chunk of the LM-head CE: [rows, chunk, vocab] f32 logits
            # LoRA adapters on the decoder's linear layers (model/lora.py); rank 0 = off. With adapters only they
            # train (the base is frozen); export merges them: W + (alpha/rank)·A·B.
            lora=ml_collections.ConfigDict(
                dict(rank=0, alpha=16.0, experts=("und", "gen"), targets=("q", "k", "v", "o", "mlp"))
            ),
            # Bagel assembly
            visual_gen=True,
            visual_und=True,
            latent_patch_size=2,
            max_latent_size=64,
            vit_max_num_patch_per_side=70,
            connector_act="gelu_pytorch_tanh",
            interpolate_pos=False,
            timestep_shift=1.0,
            vit=ml_collections.ConfigDict(
                dict(
                    hidden_size=1152,
                    intermediate_size=4304,
                    num_layers=26,
                    num_heads=16,
                    patch_size=14,
                    layer_norm_eps=1e-6,
                    hidden_act="gelu_pytorch_tanh",
                    num_positions=4900,
                    scan_layers=False,  # nn.scan over the SigLIP layers (one compiled layer; same params, stacked)
                    # a ViT-stage workdir (bagel_jax/train/vit_train.py), its export/, or any transformers SigLIP vision
                    # checkpoint (dir or .safetensors): a fresh run loads params['vit_model'] from it
                    init_from="",
                )
            ),
            vae=ml_collections.ConfigDict(
                dict(
                    ch=128,
                    ch_mult=(1, 2, 4, 4),
                    num_res_blocks=2,
                    z_channels=16,
                    in_channels=3,
                    out_ch=3,
                    scale_factor=0.3611,
                    shift_factor=0.1159,
                    dtype="bfloat16",
                    # a VAE-stage workdir (bagel_jax/train/vae_train.py) or its export/ae.safetensors: a fresh run loads
                    # params['vae'] from it, and its vae.json sets scale_factor / shift_factor
                    init_from="",
                    # encode a row's image slots one after another (scan): per-chip VAE activations of one image per row
                    # instead of max_vae_images (what lets 12 × 1024² images per row fit; slower for tiny images)
                    encode_scan=False,
                    # encode_scan's walk over the slots: "per_chip" = each chip sorts its own images by size and
                    # skips its own empty slots (a shard_map; its share of k slots per row per encode call),
                    # "global" = a scan step per k slots of every row, skipped only where all rows' slots are
                    # empty (the oracle); model/vae_per_chip.py
                    encode_scan_mode="global",
                    # how a row's image slots are encoded (model/vae_batch.py): "masked" = every slot's full
                    # canvas (the oracle), "by_size" = real images only, chunk by chunk at size buckets, "auto" =
                    # by_size on CPU
                    encode="auto",
                    encode_levels=1,  # by_size: bucket sizes per canvas side (canvas·k/levels); each is one compile
                    encode_chunk=4,  # by_size: images per encode call
                    # the official trainer's encode: each image zero-padded to its row's largest (h, w), so a small
                    # image's latent depends on the padding (reproduces an official run step for step); off = each
                    # image alone, as inference sees it
                    reference_padding=False,
                )
            ),
        )
    )


def _data() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            seq_len=32768,
            und_len=24576,
            gen_len=8192,
            max_vit_patches=16384,
            max_vae_images=8,
            vae_image_size=(1024, 1024),  # static (H, W) pad size for VAE images; multiples of 16
            batch_size=8,  # global rows per step
            data_dir="",
            builder="synthetic_shapes",
            tokenizer="",
            seed=42,
            mixture=ml_collections.ConfigDict(dict(t2i=1.0, vlm=1.0, edit=1.0, video=0.0, web=0.0)),
            vit_transform=(980, 224, 14),
            vae_transform=(1024, 512, 16),  # (max side, min side, stride)
            text_cond_dropout_prob=0.1,
            vit_cond_dropout_prob=0.3,
            vae_cond_dropout_prob=0.3,
            # video records with frame_indexes (data/records.py): 0 = the reference's random split (k ~ U{1..n-1}
            # context frames, all the rest noised); k > 0 = k context frames → the next frame as the one target
            future_context_frames=0,
            ce_loss_reweighting=False,
            num_workers=2,
            prefetch=2,
            shuffle=True,
            # where each mixture kind reads from: "name[/config][:split]" under data_dir; "" = f"{builder}:{kind}"
            sources=ml_collections.ConfigDict(dict(t2i="", vlm="", edit="", video="", web="")),
            max_docs_per_row=256,  # documents per row (static size of the per-row record ids)
            # label slots per row (the packer never puts more CE labels in a row); the model gathers the final hidden
            # states of these slots into a [rows, max_labels_per_row] buffer and runs the LM head there only.
            # 0 = the LM head at every und slot (the dense path; ViT and padding slots included)
            max_labels_per_row=0,
            pack_buffer=64,  # documents the packer holds to choose from when filling a row
            max_input_pixels=200_000_000,  # images with more pixels (header size) are skipped as image_too_large
            # per-kind ViT resize rule, () = data.vit_transform (the reference's yaml: edit (518, 224, 14),
            # vlm (980, 378, 14, 2_007_040))
            vit_transform_by_kind=ml_collections.ConfigDict(dict(t2i=(), vlm=(), edit=(), video=(), web=())),
            # dtype of vae_images / vit_patches: "float32" in [-1, 1] (PackedBatch contract) or "uint8" in [0, 255]
            # (4x fewer host bytes; the model then normalises x / 127.5 - 1 and zeroes VAE padding using vae_hw)
            pixel_dtype="float32",
            emulate_hosts=1,  # > 1: one process reads as this many hosts (reproduces a multi-host data stream)
            synthetic_examples=0,  # > 0: the trainer builds synthetic_shapes (this many per split) if data_dir lacks it
            synthetic_square=False,  # the synthetic_shapes images are square (width = height)
            # draw weights of the synthetic vlm questions' kinds (count, colour, position); equal = uniform
            synthetic_question_weights=(1.0, 1.0, 1.0),
        )
    )


def _train() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            steps=500_000,
            seed=4396,
            lr=1e-4,
            min_lr=1e-7,
            warmup_steps=2000,
            schedule="constant",
            beta1=0.9,
            beta2=0.95,
            eps=1e-15,
            weight_decay=0.0,
            max_grad_norm=1.0,
            ema_decay=0.9999,
            # fused: clip + AdamW + EMA + the non-finite guard as one elementwise pass per param (train/update.py);
            # optax: optax's chain (the oracle; ~2x slower on CPU); auto: fused on one device, optax on several
            update_impl="auto",
            ce_weight=1.0,
            mse_weight=1.0,
            grad_accum_steps=1,
            freeze=(),  # subset of ("vit", "connector", "und", "gen", "llm"); the VAE is always frozen
            # per-module learning-rate factors (train/optim.py): a param's lr is lr × the product of the factors of the
            # modules (freeze's names and patterns) it belongs to, e.g. und=0.1 for a slower und expert
            lr_scale=ml_collections.ConfigDict(dict(vit=1.0, connector=1.0, und=1.0, gen=1.0, llm=1.0)),
            # what a step with NaN/inf loss or gradients does (train/nonfinite.py): skip (its update; halt
            # after max_consecutive_nonfinite in a row, 0 = never) | halt | rollback (to the newest usable
            # checkpoint, then skip rollback_skip_batches batches; at most max_rollbacks times, then halt)
            nonfinite="skip",
            max_consecutive_nonfinite=100,
            rollback_skip_batches=200,
            max_rollbacks=3,
            # keep_checkpoints: the newest N checkpoints are kept (0 = all); the newest is never deleted
            log_every=10,
            checkpoint_every=2000,
            keep_checkpoints=3,
            init_from="",
            eval_every=0,
            peak_tflops=0.0,
            # every sample_every steps (0 = never): EMA-model images for sample_prompts (sample_steps Euler steps)
            # and its answer to sample_question about the first image, written to TensorBoard
            sample_every=0,
            sample_prompts=("a red circle",),
            sample_question="",
            sample_steps=20,
        )
    )


def _parallel() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            data=-1,
            fsdp=1,
            tensor=1,
            sequence=1,  # -1 fills with the remaining devices
            dcn_data=1,
            dcn_fsdp=1,  # multi-slice (DCN) sizes
            rules_override=ml_collections.ConfigDict(),
        )
    )


def _vae_stage() -> ml_collections.ConfigDict:
    """Keys read only by the VAE stage (bagel_jax/train/vae_train.py, configs/tiny_vae.py)."""
    return ml_collections.ConfigDict(
        dict(
            loss="l2",  # l2 | l1: the reconstruction term
            kl_weight=1e-6,  # on the per-latent-element mean KL
            eval_every=250,  # steps between held-out PSNR evals (0 = only at the end)
            eval_images=64,
            eval_seed=1042,
            eval_batch=16,  # held-out images from the shapes generator with eval_seed
            stats_images=256,  # training images for the latent mean/std (scale_factor / shift_factor)
            export="params",  # params | ema: which weights go to <workdir>/export
        )
    )


def _vit_stage() -> ml_collections.ConfigDict:
    """Keys read only by the ViT stage (bagel_jax/train/vit_train.py, configs/tiny_vit.py)."""
    return ml_collections.ConfigDict(
        dict(
            eval_every=250,  # steps between held-out evals (0 = only at the end)
            eval_images=256,
            eval_seed=1042,
            eval_batch=64,  # held-out scenes from the shapes generator with eval_seed
            export="params",  # params | ema: which weights go to <workdir>/export
        )
    )


def base_config() -> ml_collections.ConfigDict:
    """Every key the project knows, with release-like defaults (BAGEL-7B-MoT)."""
    return ml_collections.ConfigDict(
        dict(
            model=_model(),
            data=_data(),
            train=_train(),
            parallel=_parallel(),
            evals=ml_collections.ConfigDict(),
            name="bagel",
            vae_stage=_vae_stage(),
            vit_stage=_vit_stage(),
        )
    )


# --- validation ------------------------------------------------------------------------------------

CHOICES = {
    "model.layer_module": ("mot", "dense"),
    "model.dtype": ("float32", "bfloat16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.attention_impl": ("reference", "tpu", "gpu", "auto"),
    "model.remat": ("none", *REMAT_POLICIES),
    "model.mlp_tokens": ("auto", "batched", "flat"),
    "model.vit_patches": ("auto", "all", "used"),
    "model.vae.dtype": ("float32", "bfloat16"),
    "model.vae.encode": ("auto", "masked", "by_size"),
    "model.vae.encode_scan_mode": ("per_chip", "global"),
    "model.connector_act": ("gelu_pytorch_tanh", "gelu", "silu"),
    "model.vit.hidden_act": ("gelu_pytorch_tanh", "gelu"),
    "train.schedule": ("constant", "cosine"),
    "train.nonfinite": ("skip", "halt", "rollback"),
    "train.update_impl": ("auto", "fused", "optax"),
    "data.pixel_dtype": ("float32", "uint8"),
}
FREEZABLE = ("vit", "connector", "und", "gen", "llm")
LORA_EXPERTS = ("und", "gen")
LORA_KINDS = ("q", "k", "v", "o", "mlp")  # attention projections, and the MLP's gate/up/down
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
        _check(
            m.hidden_size % m.num_heads == 0,
            "model.num_heads",
            f"{m.num_heads} heads do not divide hidden_size {m.hidden_size}",
        )
    _check(
        m.num_heads % m.num_kv_heads == 0,
        "model.num_kv_heads",
        f"{m.num_kv_heads} kv heads do not divide num_heads {m.num_heads}",
    )
    v = m.vit
    _check(
        v.hidden_size % v.num_heads == 0,
        "model.vit.num_heads",
        f"{v.num_heads} heads do not divide vit.hidden_size {v.hidden_size}",
    )
    _check(
        v.num_positions >= m.vit_max_num_patch_per_side**2,
        "model.vit.num_positions",
        f"{v.num_positions} < vit_max_num_patch_per_side² = {m.vit_max_num_patch_per_side**2}",
    )
    _check(m.vae.ch % 32 == 0, "model.vae.ch", f"must be a multiple of 32 (GroupNorm groups), got {m.vae.ch}")
    for key in ("encode_levels", "encode_chunk"):
        _check(m.vae[key] >= 1, f"model.vae.{key}", f"must be >= 1, got {m.vae[key]}")
    _check(m.timestep_shift > 0, "model.timestep_shift", f"must be > 0, got {m.timestep_shift}")


@rule
def _lora(c):
    m, lo = c.model, c.model.lora
    _check(lo.rank >= 0, "model.lora.rank", f"must be >= 0 (0 = no LoRA), got {lo.rank}")
    if lo.rank == 0:
        return
    _check(lo.alpha > 0, "model.lora.alpha", f"must be > 0, got {lo.alpha}")
    _check(len(lo.experts) > 0, "model.lora.experts", "empty (choose from und, gen)")
    for e in lo.experts:
        _check(e in LORA_EXPERTS, "model.lora.experts", f"unknown expert {e!r} (choose from {', '.join(LORA_EXPERTS)})")
        _check(
            e == "und" or m.layer_module == "mot",
            "model.lora.experts",
            f"layer_module={m.layer_module!r} has no gen expert (its one expert is 'und')",
        )
    _check(len(lo.targets) > 0, "model.lora.targets", f"empty (choose from {', '.join(LORA_KINDS)})")
    dims = lora_layer_dims(m)
    for t in lo.targets:
        _check(t in LORA_KINDS, "model.lora.targets", f"unknown layer kind {t!r} (choose from {', '.join(LORA_KINDS)})")
        _check(
            lo.rank <= min(dims[t]),
            "model.lora.rank",
            f"{lo.rank} > the smaller dim {min(dims[t])} of the {t!r} layers ([{dims[t][0]}, {dims[t][1]}])",
        )


@rule
def _budgets(c):
    d = c.data
    _check(
        d.und_len + d.gen_len == d.seq_len,
        "data.seq_len",
        f"und_len {d.und_len} + gen_len {d.gen_len} != seq_len {d.seq_len}",
    )
    for k in ("seq_len", "und_len", "batch_size", "max_vae_images", "max_vit_patches"):
        _check(d[k] > 0, f"data.{k}", f"must be > 0, got {d[k]}")
    _check(d.gen_len >= 0, "data.gen_len", f"must be >= 0, got {d.gen_len}")
    h, w = d.vae_image_size
    stride = 8 * c.model.latent_patch_size
    _check(
        h % stride == 0 and w % stride == 0 and h > 0 and w > 0,
        "data.vae_image_size",
        f"{(h, w)} must be positive multiples of {stride}",
    )
    _check(
        max(h, w) // stride <= c.model.max_latent_size,
        "data.vae_image_size",
        f"{(h, w)} has more than max_latent_size={c.model.max_latent_size} latent tokens per side",
    )
    for k in ("text_cond_dropout_prob", "vit_cond_dropout_prob", "vae_cond_dropout_prob"):
        _check(0.0 <= d[k] <= 1.0, f"data.{k}", f"must be in [0, 1], got {d[k]}")
    _check(
        isinstance(d.future_context_frames, int) and d.future_context_frames >= 0,
        "data.future_context_frames",
        f"must be an int >= 0 (0 = the reference's random split), got {d.future_context_frames!r}",
    )
    for k, wgt in d.mixture.items():
        _check(wgt >= 0, f"data.mixture.{k}", f"weight must be >= 0, got {wgt}")
    _check(sum(d.mixture.values()) > 0, "data.mixture", "all weights are 0")


@rule
def _data_transforms(c):
    d, m = c.data, c.model
    specs = [
        ("vit_transform", d.vit_transform, m.vit.patch_size),
        ("vae_transform", d.vae_transform, 8 * m.latent_patch_size),
    ]
    specs += [(f"vit_transform_by_kind.{k}", v, m.vit.patch_size) for k, v in d.vit_transform_by_kind.items() if v]
    for key, spec, stride in specs:
        spec = tuple(spec)
        _check(
            len(spec) in (3, 4) and all(isinstance(v, int) and v > 0 for v in spec),
            f"data.{key}",
            f"must be (max_size, min_size, stride[, max_pixels]) positive ints, got {spec}",
        )
        _check(spec[2] == stride, f"data.{key}", f"stride {spec[2]} must equal {stride}")
        _check(spec[1] <= spec[0], f"data.{key}", f"min_size {spec[1]} > max_size {spec[0]}")
    for key, spec, _ in specs[:1] + specs[2:]:
        vit_side = spec[0] // m.vit.patch_size
        _check(
            vit_side <= m.vit_max_num_patch_per_side,
            f"data.{key}",
            f"max_size {spec[0]} gives {vit_side} patches per side > "
            f"model.vit_max_num_patch_per_side={m.vit_max_num_patch_per_side}",
        )
    _check(
        d.vae_transform[0] <= min(d.vae_image_size),
        "data.vae_transform",
        f"max_size {d.vae_transform[0]} exceeds data.vae_image_size {tuple(d.vae_image_size)}",
    )
    _check(
        d.max_vit_patches <= d.und_len,
        "data.max_vit_patches",
        f"{d.max_vit_patches} > und_len {d.und_len} (every patch takes an und slot)",
    )
    _check(d.max_docs_per_row >= 1, "data.max_docs_per_row", f"must be >= 1, got {d.max_docs_per_row}")
    _check(
        0 <= d.max_labels_per_row <= d.und_len,
        "data.max_labels_per_row",
        f"must be in [0, und_len={d.und_len}] (0 = every und slot), got {d.max_labels_per_row}",
    )
    _check(c.model.ce_chunk >= 1, "model.ce_chunk", f"must be >= 1, got {c.model.ce_chunk}")
    _check(d.pack_buffer >= 1, "data.pack_buffer", f"must be >= 1, got {d.pack_buffer}")
    _check(
        d.emulate_hosts >= 1 and d.batch_size % d.emulate_hosts == 0,
        "data.emulate_hosts",
        f"must be >= 1 and divide batch_size {d.batch_size}, got {d.emulate_hosts}",
    )


@rule
def _training(c):
    t = c.train
    _check(t.steps >= 0, "train.steps", f"must be >= 0, got {t.steps}")
    for k in (
        "lr",
        "min_lr",
        "weight_decay",
        "max_grad_norm",
        "warmup_steps",
        "keep_checkpoints",
        "eval_every",
        "sample_every",
        "peak_tflops",
    ):
        _check(t[k] >= 0, f"train.{k}", f"must be >= 0, got {t[k]}")
    for k in ("log_every", "checkpoint_every", "sample_steps"):  # steps between events / Euler steps
        _check(t[k] >= 1, f"train.{k}", f"must be >= 1, got {t[k]}")
    _check(0.0 <= t.ema_decay <= 1.0, "train.ema_decay", f"must be in [0, 1], got {t.ema_decay}")
    for k in ("beta1", "beta2"):
        _check(0.0 <= t[k] < 1.0, f"train.{k}", f"must be in [0, 1), got {t[k]}")
    _check(t.eps > 0, "train.eps", f"must be > 0, got {t.eps}")
    _check(t.grad_accum_steps >= 1, "train.grad_accum_steps", f"must be >= 1, got {t.grad_accum_steps}")
    for key in ("max_consecutive_nonfinite", "rollback_skip_batches", "max_rollbacks"):
        _check(t[key] >= 0, f"train.{key}", f"must be >= 0, got {t[key]}")
    _check(
        c.data.batch_size % t.grad_accum_steps == 0,
        "train.grad_accum_steps",
        f"{t.grad_accum_steps} microbatches do not divide data.batch_size={c.data.batch_size}",
    )
    for name, factor in t.lr_scale.items():
        _check(
            factor > 0,
            f"train.lr_scale.{name}",
            f"must be > 0 (to stop a module training use train.freeze), got {factor}",
        )
    for name in t.freeze:
        _check(name in FREEZABLE, "train.freeze", f"unknown module {name!r} (freezable: {', '.join(FREEZABLE)})")


# The TPU kernel's tiles (attention/tpu_split_splash.py LANES, attention/block_map.py MAX_BLOCKS; tests check they
# agree): block sizes are multiples of 128 and a row holds at most 2048 blocks per sequence axis.
ATTENTION_LANES, ATTENTION_MAX_BLOCKS = 128, 2048


@rule
def _attention_blocks(c):
    m = c.model
    for k in ("attention_block_q", "attention_block_kv"):
        block = m[k]
        _check(
            block > 0 and block % ATTENTION_LANES == 0,
            f"model.{k}",
            f"must be a positive multiple of {ATTENTION_LANES} (the TPU kernel's lane width), got {block}",
        )
        blocks = -(-c.data.seq_len // block)
        _check(
            blocks <= ATTENTION_MAX_BLOCKS,
            f"model.{k}",
            f"{block} splits data.seq_len={c.data.seq_len} into {blocks} blocks > {ATTENTION_MAX_BLOCKS}",
        )


@rule
def _loader(c):
    d = c.data
    for k in ("num_workers", "prefetch", "synthetic_examples"):
        _check(d[k] >= 0, f"data.{k}", f"must be >= 0, got {d[k]}")
    _check(d.max_input_pixels > 0, "data.max_input_pixels", f"must be > 0, got {d.max_input_pixels}")
    w = d.synthetic_question_weights
    ok = isinstance(w, (tuple, list)) and len(w) == 3 and all(isinstance(x, (int, float)) for x in w)
    ok = ok and all(math.isfinite(x) and x >= 0 for x in w) and sum(w) > 0
    _check(ok, "data.synthetic_question_weights", f"must be 3 finite numbers >= 0 with a positive sum, got {w}")


@rule
def _mesh(c):
    p = c.parallel
    sizes = [p.data, p.fsdp, p.tensor, p.sequence]
    for name, s in zip(("data", "fsdp", "tensor", "sequence"), sizes):
        _check(s == -1 or s >= 1, f"parallel.{name}", f"must be >= 1 or -1 (fill), got {s}")
    _check(sizes.count(-1) <= 1, "parallel", "at most one mesh axis may be -1")
    _check(
        c.model.num_kv_heads % p.tensor == 0 or p.tensor == -1,
        "parallel.tensor",
        f"tensor={p.tensor} does not divide model.num_kv_heads={c.model.num_kv_heads}",
    )


def validate(
    config: ml_collections.ConfigDict,
    num_devices: int | None = None,
    platform: str | None = None,
    num_processes: int = 1,
) -> ml_collections.ConfigDict:
    """Checks ``config`` against the schema; raises ``ConfigError`` naming the first bad key.

    ``num_devices`` (optional) also checks the mesh, the batch and accumulation against the device count (and the
    batch against ``num_processes`` hosts);
    ``platform`` (optional, ``jax.default_backend()`` of the run: cpu | gpu | tpu) checks the attention
    kernel against it. Pure: reads nothing but the config (see ``check_paths`` for the filesystem).
    """
    schema = dict(_flatten(base_config()))
    for key, value in _flatten(config):
        if key not in schema:
            raise ConfigError(unknown_key_message(key, schema))
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
        check_devices(config, num_devices, num_processes)
    if platform is not None:
        check_platform(config, platform)
    return config


def unknown_key_message(key: str, known) -> str:
    """``"train.lrr: unknown config key (did you mean train.lr?)"``; ``known``: the valid dotted keys."""
    known = list(known)
    sections = {k.rsplit(".", i)[0] for k in known for i in range(1, k.count(".") + 1)}
    close = difflib.get_close_matches(key, known + sorted(sections), n=1, cutoff=0.6)
    if not close:  # a typo in the last part only: compare it with its siblings
        parent, _, leaf = key.rpartition(".")
        siblings = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == parent]
        close = [f"{parent}.{m}" if parent else m for m in difflib.get_close_matches(leaf, siblings, n=1)]
    return f"{key}: unknown config key" + (f" (did you mean {close[0]}?)" if close else "")


def config_keys(config) -> list[str]:
    """Every dotted leaf key of ``config`` (free-form sections count as leaves)."""
    return [k for k, _ in _flatten(config)]


def check_platform(config, platform: str) -> None:
    """``model.attention_impl`` against the backend the run compiles for (``tpu`` needs TPU devices)."""
    impl = config.model.attention_impl
    _check(
        impl != "tpu" or platform == "tpu",
        "model.attention_impl",
        f"'tpu' (the Pallas TPU kernel) cannot run on {platform} devices; use 'auto', 'gpu' or 'reference'",
    )


def check_devices(config, num_devices: int, num_processes: int = 1) -> tuple[int, int, int, int]:
    """Resolves -1 in the mesh and checks it, the batch and accumulation against ``num_devices`` (and the batch
    against ``num_processes`` hosts, each loading its share); returns the mesh sizes."""
    p = config.parallel
    sizes = [p.data, p.fsdp, p.tensor, p.sequence]
    fixed = 1
    for s in sizes:
        fixed *= s if s != -1 else 1
    if -1 in sizes:
        _check(num_devices % fixed == 0, "parallel", f"mesh axes {sizes} do not divide {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // fixed
    total = sizes[0] * sizes[1] * sizes[2] * sizes[3]
    _check(
        total == num_devices,
        "parallel",
        f"mesh {dict(zip(('data', 'fsdp', 'tensor', 'sequence'), sizes))} "
        f"has {total} devices, but {num_devices} are present",
    )
    batch_shards = sizes[0] * sizes[1]
    _check(
        config.data.batch_size % batch_shards == 0,
        "data.batch_size",
        f"{config.data.batch_size} rows not divisible by data×fsdp = {batch_shards}",
    )
    k = config.train.grad_accum_steps
    _check(
        config.data.batch_size % (batch_shards * k) == 0,
        "train.grad_accum_steps",
        f"{k} microbatches × {batch_shards} batch shards (data×fsdp) do not divide "
        f"data.batch_size={config.data.batch_size}",
    )
    _check(
        config.data.batch_size % num_processes == 0,
        "data.batch_size",
        f"{config.data.batch_size} rows not divisible by {num_processes} hosts",
    )
    return tuple(sizes)


# --- the filesystem --------------------------------------------------------------------------------

# Layouts read by the loaders (data/builders/synthetic_shapes.py, train/vae_train.py, train/vit_train.py);
# tests check they agree.
SHAPES_TOKENIZER = os.path.join("synthetic_shapes", "tokenizer.model")
VAE_EXPORT_FILES, VIT_EXPORT_FILES = ("ae.safetensors", "vae.json"), ("model.safetensors",)
EXPORT_DIR = "export"
STAGE_INPUTS = {  # what each program reads besides its workdir
    "bagel": ("tokenizer", "datasets", "init_from", "towers"),
    "vae": ("datasets",),
    "vit": (),
    "eval": ("tokenizer",),
    "eval_untrained": ("tokenizer", "towers"),  # a run's evaluation (eval/runner.py)
}


def is_remote(path: str) -> bool:
    """``gs://…`` and other URLs: not checked from this machine."""
    return "://" in str(path)


def latest_checkpoint(workdir: str) -> int | None:
    """The newest finished checkpoint step in ``workdir/checkpoints`` (unfinished saves have non-numeric names)."""
    root = os.path.join(workdir, "checkpoints")
    if is_remote(workdir) or not os.path.isdir(root):
        return None
    steps = [int(n) for n in os.listdir(root) if n.isdigit() and os.path.isdir(os.path.join(root, n))]
    return max(steps, default=None)


def check_writable_dir(path: str, key: str) -> None:
    """``path`` is a directory this process can write in, or can be created: probes the nearest existing ancestor by
    creating (and removing) a file there, as permissions alone do not tell (root, read-only mounts)."""
    target = os.path.abspath(path)
    if os.path.exists(target):
        _check(os.path.isdir(target), key, f"{path} exists and is not a directory")
    else:
        while not os.path.exists(target):
            target = os.path.dirname(target)
        _check(os.path.isdir(target), key, f"cannot create {path}: {target} is not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=target, prefix=".bagel_write_probe_"):
            pass
    except OSError as e:
        where = path if target == os.path.abspath(path) else f"{target} (to create {path})"
        raise ConfigError(f"{key}: cannot write in {where}: {e.strerror or e}") from None


def _check_tower(path: str, key: str, files: tuple[str, ...], stage: str) -> None:
    if not path or is_remote(path):
        return
    _check(os.path.exists(path), key, f"{path} does not exist")
    if os.path.isfile(path):  # the weights file itself: the rest of the export must sit beside it
        beside = os.path.dirname(os.path.abspath(path))
        missing = [f for f in files[1:] if not os.path.isfile(os.path.join(beside, f))]
        _check(not missing, key, f"no {' + '.join(missing)} next to {path}")
        return
    for cand in (path, os.path.join(path, EXPORT_DIR)):
        if all(os.path.isfile(os.path.join(cand, f)) for f in files):
            return
    raise ConfigError(
        f"{key}: no {' + '.join(files)} in {path} or {os.path.join(path, EXPORT_DIR)} "
        f"(run python -m bagel_jax.train.{stage}_train first)"
    )


def _has_dataset(data_dir: str, name: str) -> bool:
    root = os.path.join(data_dir, name)
    for _, _, files in os.walk(root):
        if "dataset_info.json" in files:
            return True
    return False


def check_paths(config, workdir: str | None = None, stage: str = "bagel") -> None:
    """The filesystem against ``config``, before anything is built: the workdir can be written, and the inputs the
    ``stage`` (``STAGE_INPUTS``) reads exist: the tokenizer, the datasets of the mixture, ``train.init_from`` (on a
    fresh start), ``model.vae.init_from`` / ``model.vit.init_from``. Remote (``gs://``) paths are skipped.

    Raises ``ConfigError`` naming the key (``workdir`` for the workdir itself).
    """
    needs = STAGE_INPUTS[stage]
    if workdir and not is_remote(workdir):
        check_writable_dir(workdir, "workdir")
        ckpts = os.path.join(workdir, "checkpoints")
        if os.path.exists(ckpts):
            check_writable_dir(ckpts, "workdir")
    d = config.data
    data_dir = d.data_dir or (os.path.join(workdir, "data") if workdir else "")
    # a trainer that reads datasets builds the synthetic shapes (and their tokenizer) when asked
    builds_shapes = "datasets" in needs and d.builder == "synthetic_shapes" and d.synthetic_examples > 0
    if data_dir and not is_remote(data_dir):
        if builds_shapes:
            check_writable_dir(data_dir, "data.data_dir")
        elif "datasets" in needs:
            kinds = [k for k, w in d.mixture.items() if w > 0] if stage == "bagel" else ["t2i"]
            for kind in kinds:
                name = (d.sources[kind] or d.builder).partition(":")[0]
                if not _has_dataset(data_dir, name):
                    key = f"data.sources.{kind}" if d.sources[kind] else "data.data_dir"
                    hint = " (or set data.synthetic_examples > 0 to build it)" if name == "synthetic_shapes" else ""
                    raise ConfigError(
                        f"{key}: no built dataset {name!r} under {data_dir} for data.mixture.{kind}{hint}"
                    )
    if "tokenizer" in needs:
        if d.tokenizer:
            _check(
                is_remote(d.tokenizer) or os.path.isfile(d.tokenizer), "data.tokenizer", f"{d.tokenizer}: no such file"
            )
        elif d.builder != "synthetic_shapes":
            raise ConfigError(
                f"data.tokenizer: empty, and data.builder={d.builder!r} ships none (only synthetic_shapes does)"
            )
        elif not builds_shapes and data_dir and not is_remote(data_dir):
            path = os.path.join(data_dir, SHAPES_TOKENIZER)
            _check(
                os.path.isfile(path),
                "data.tokenizer",
                f"empty, and {path} does not exist (set data.tokenizer, or data.synthetic_examples > 0 to "
                f"build the shapes data and its tokenizer)",
            )
    init = config.train.init_from
    fresh = not workdir or (not is_remote(workdir) and latest_checkpoint(workdir) is None)  # a resume never reads it
    if "init_from" in needs and init and not is_remote(init) and fresh:
        _check(os.path.exists(init), "train.init_from", f"{init} does not exist")
    if "towers" in needs:
        _check_tower(config.model.vae.init_from, "model.vae.init_from", VAE_EXPORT_FILES, "vae")
        _check_tower(config.model.vit.init_from, "model.vit.init_from", VIT_EXPORT_FILES, "vit")


def has_key(config, dotted: str) -> bool:
    """Whether ``config`` holds the dotted key (a leaf or a section)."""
    return _has(config, dotted)


def _has(config, dotted: str) -> bool:
    node = config
    for part in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return False
        node = node[part]
    return True


def head_dim(model_cfg) -> int:
    return model_cfg.head_dim or model_cfg.hidden_size // model_cfg.num_heads


def lora_layer_dims(model_cfg) -> dict[str, tuple[int, int]]:
    """LoRA kind -> (in, out) features of its kernels (flattened over heads), for the rank check."""
    d, hd, f = model_cfg.hidden_size, head_dim(model_cfg), model_cfg.intermediate_size
    return {
        "q": (d, model_cfg.num_heads * hd),
        "k": (d, model_cfg.num_kv_heads * hd),
        "v": (d, model_cfg.num_kv_heads * hd),
        "o": (model_cfg.num_heads * hd, d),
        "mlp": (d, f),
    }
