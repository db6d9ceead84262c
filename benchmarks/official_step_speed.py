"""Tokens/s of one full train step of the OFFICIAL PyTorch BAGEL code (ByteDance-Seed/Bagel) on this machine's CPU,
fp32, on packs comparable to benchmarks/step_speed.py's: the "official" column next to our step.

    python benchmarks/official_step_speed.py --official_src=/path/to/Bagel \\
        [--models 96x3,256x4,512x8] [--packs 1024,4096] [--steps 5] [--threads 2] [--warm_pass]
        [--out official.json]

``--official_src`` is a checkout of github.com/ByteDance-Seed/Bagel (read at 056b5fd); nothing of it lives in this
repository. Needs torch (CPU), transformers, einops, safetensors, pillow, numpy, pyarrow; torchvision, decord and
flash_attn are stubbed when missing (below). Runs with this repository's test venv (torch 2.13 CPU, transformers 5.x).

What one step is (train/pretrain_unified_navit.py's loop body, one micro-batch, one process, no FSDP): the frozen
VAE ``encode`` of the pack's ``padded_images`` under ``no_grad``; ``Bagel.forward`` (ViT + connector, latent
patchify + noise + time embedding, MoT LLM, llm2vae and lm_head on the loss positions); loss = ce.sum() / #ce tokens
+ mse.mean(-1).sum() / #mse tokens (ce_weight = mse_weight = 1, no reweighting); ``backward``;
``clip_grad_norm_(1.0)``; ``AdamW(betas 0.9/0.95, eps 1e-15, weight_decay 0).step()``; the LR scheduler step
(constant after a 1-step warm-up, as step_speed.py's ``warmup_steps=1``: the untimed warm-up step runs at lr 0); the
EMA update of a deep copy of the model (``_foreach_mul_ / _foreach_add_`` on the parameters that require grad, as
``fsdp_ema_update``); ``zero_grad``. fp32 throughout, ``torch.set_num_threads`` (2). Timed: exactly that, per pack
(wall clock, and process CPU time of all threads); the data pipeline (sample construction, ``pack_sequence``,
``to_tensor``) is not timed, as in ours. One warm-up step, then ``--steps`` timed steps, each on a new pack (the
same packs for every model); ``--warm_pass``: the timed packs also run once untimed first, as step_speed.py's.

Packs, built by the OFFICIAL data code: ``PackedDataset.__iter__`` (data/dataset_base.py: mandatory groups, weighted
group choice, the overflow buffer, ``pack_sequence``, ``to_tensor``) on an instance made with ``object.__new__``
(no dataset files), ``use_flex=False`` (one dense [L, L] mask per sample, ``nested_attention_masks``: the only path
with a CPU backward), ``max_num_tokens = expected_num_tokens = --packs``, ``prefer_buffer_before`` = half of that
(the official 16384 / 32768), buffer 50; CFG dropout text 0.1 / ViT 0.3 / VAE 0.3 (the train script's values and
ours); interpolated position ids, timestep shift 3.0 (configs/tiny_repro.py). Groups and weights as step_speed.py pins
them, t2i / vlm / edit = 2.0 / 1.5 / 0.5 (t2i and vlm ``is_mandatory`` as in example.yaml, so that every pack has
a ViT image and a noised VAE image, which the official forward requires). Samples have the official datasets'
layouts and our synthetic shapes' sizes; pixels are random and text ids random in the 508 non-special ids (speed
does not depend on either):
* t2i (the ``T2IIterableDataset`` sample): a caption of 10–20 tokens (text, cfg) + one 48 px VAE image, noised
  (3×3 latent patches of 16 px → 9 gen tokens);
* vlm (``SftJSONLIterableDataset.change_format`` on a LLaVA conversation, then its plan loop): one 42 px ViT image
  (3×3 patches of 14 px) + 1–3 question (5–8 tokens) / answer (3–6 tokens, loss) turns, half of them followed by
  "Describe the image." (4) / a caption (10–20, loss);
* edit (``UnifiedEditIterableDataset.parse_row`` on a row of 2–3 PNG images and instruction pairs of 4–9 tokens):
  the source as clean VAE + ViT, instruction(s), the target noised (one or two steps, as parse_row picks).

Models (``HxN``, as step_speed.py): the official ``Qwen2ForCausalLM`` with ``Qwen2MoTDecoderLayer`` (hidden H, N
layers, 4 q / 2 kv heads, intermediate 4·H, qk_norm, untied lm_head, vocab 512 incl. the 4 special tokens,
``init_moe``); ``SiglipVisionModel`` 3 layers × 64 (intermediate 128, 2 heads, patch 14, rope off, conv patch
embedding converted to Linear); the official ``AutoEncoder`` with ch 32, ch_mult [1, 1, 1, 1], 1 res block, z 16,
downsample 8 (frozen: freeze_vae=True); latent patch 2, max_latent_size 16, vit_max_num_patch_per_side 16.
Random weights (llm2vae zero-initialised by Bagel, as upstream).

Shims, all in ``install_shims`` / ``patch_official`` (the official code targets CUDA, flash-attn, transformers 4.49):
* ``flash_attn`` (imported by qwen2_navit.py and siglip_navit.py; only the SigLIP forward calls it in training):
  a stub module with a ``__spec__``; its ``flash_attn_varlen_func`` runs ``F.scaled_dot_product_attention`` on the
  varlen segments, batched in one call when all segments have the same length (every 42 px image here: 9 patches),
  else one call per segment; differentiable.
* ``sdpa_kernel(backends=[EFFICIENT_ATTENTION])`` around the nested-mask SDPA in qwen2_navit.py: replaced by a null
  context (no efficient-attention backend on CPU; the CPU default backend choice runs instead).
* hard-coded ``.to(torch.bfloat16)`` casts in qwen2_navit.py / siglip_navit.py: their module-global ``torch`` is a
  proxy whose ``bfloat16`` is ``float32`` (an fp32 run, like ours; upstream trains bf16 under FSDP mixed precision).
* transformers 5.x: ``Qwen2Config(pad_token_id=None)`` (5.x configs no longer define it; qwen2_navit.py reads it)
  and a ``"default"`` entry (plain RoPE, 4.x's ``_compute_default_rope_parameters``) in modeling_qwen2.py's
  ``ROPE_INIT_FUNCTIONS`` (5.x dropped it; added only when missing). Both are no-ops with transformers 4.49.
* ``torchvision`` (data/transforms.py; a CUDA wheel fails at import) and ``decord`` (data/video_utils.py): minimal stub
  modules, only when the real import fails; the script never uses them (its image transform resizes with PIL to
  the fixed sizes above and normalises to [-1, 1], what ``ImageTransform(48, 48, 16)`` / ``(42, 42, 14)`` yield).

Differences from the official trainer, by design: one process and no FSDP (no sharding, no bf16 mixed precision,
no all-reduces: the loss denominators are the pack's own token counts); no activation checkpointing unless
``--act_ckpt`` (upstream wraps Qwen2 layers, SigLIP layers and the connector; our step_speed.py runs without
remat); the packs' real length is whatever the official loop fills (close to ``--packs``), where ours leaves
padding, so compare tokens/s, not s/step.

Columns: model; pack (max_num_tokens, and the mean real tokens = ``sequence_length`` of the timed packs); s/step
(mean wall seconds of the timed steps); tokens/s = real tokens ÷ s/step; CPU s/step (the median process CPU time,
all threads: less sensitive to other jobs).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.machinery
import io
import json
import os
import random
import sys
import time
import types
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

VOCAB = 512  # tiny_repro's SentencePiece vocabulary, the 4 special tokens included (the last 4 ids here)
BOS, EOS, SOI, EOI = VOCAB - 4, VOCAB - 3, VOCAB - 2, VOCAB - 1
VAE_PX, VIT_PX = 48, 42  # tiny_repro: vae_transform (48, 48, 16), vit_transform (42, 42, 14)
MIXTURE = (("t2i", 2.0, True), ("vlm", 1.5, True), ("edit", 0.5, False))  # (group, weight, is_mandatory)


# --- shims --------------------------------------------------------------------------------------------------------
def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q=None,
    max_seqlen_k=None,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    **kw,
):
    """flash_attn's varlen attention on CPU: q [Nq, H, d], k/v [Nk, Hkv, d], segments by cu_seqlens; differentiable."""
    rep = q.shape[1] // k.shape[1]
    cq, ck = [int(x) for x in cu_seqlens_q], [int(x) for x in cu_seqlens_k]
    lq = {b - a for a, b in zip(cq[:-1], cq[1:])}
    lk = {b - a for a, b in zip(ck[:-1], ck[1:])}

    def attend(qi, ki, vi):  # [B, S, H, d] each
        lq_, lk_ = qi.shape[1], ki.shape[1]
        mask = torch.ones(lq_, lk_, dtype=torch.bool).tril(lk_ - lq_) if causal else None
        ki, vi = ki.repeat_interleave(rep, 2), vi.repeat_interleave(rep, 2)
        out = F.scaled_dot_product_attention(
            qi.transpose(1, 2), ki.transpose(1, 2), vi.transpose(1, 2), attn_mask=mask, scale=softmax_scale
        )
        return out.transpose(1, 2)

    whole = cq[0] == ck[0] == 0 and cq[-1] == q.shape[0] and ck[-1] == k.shape[0]
    if len(lq) == len(lk) == 1 and whole:  # equal segments (every 42 px image: 9 patches): one batched call
        n, s, t = len(cq) - 1, lq.pop(), lk.pop()
        out = attend(q.view(n, s, *q.shape[1:]), k.view(n, t, *k.shape[1:]), v.view(n, t, *v.shape[1:]))
        return out.reshape(q.shape)
    outs = [attend(q[a:b][None], k[c:d][None], v[c:d][None])[0] for a, b, c, d in zip(cq[:-1], cq[1:], ck[:-1], ck[1:])]
    return torch.cat(outs)


def install_shims(official_src: str) -> None:
    """Make the official code importable on a CPU-only machine (see the module docstring)."""
    sys.path.insert(0, os.path.abspath(official_src))
    fa = types.ModuleType("flash_attn")
    fa.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)  # transformers probes find_spec("flash_attn")
    fa.flash_attn_varlen_func = flash_attn_varlen_func
    sys.modules["flash_attn"] = fa
    import transformers.modeling_utils  # noqa: F401  (probes torchvision before any stub below exists)

    try:
        import torchvision  # noqa: F401
        from torchvision import transforms  # noqa: F401
    except Exception:  # not installed, or a CUDA wheel ("operator torchvision::nms does not exist")
        for name in list(sys.modules):
            if name == "torchvision" or name.startswith("torchvision."):
                del sys.modules[name]
        names = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
        tv, tvt, tvf = (types.ModuleType(n) for n in names)
        for m in (tv, tvt, tvf):
            m.__spec__ = importlib.machinery.ModuleSpec(m.__name__, None)
        tvt.InterpolationMode = types.SimpleNamespace(BICUBIC="bicubic", BILINEAR="bilinear", NEAREST="nearest")
        tvt.functional, tv.transforms = tvf, tvt
        sys.modules.update({"torchvision": tv, "torchvision.transforms": tvt, "torchvision.transforms.functional": tvf})
    try:
        import decord  # noqa: F401
    except Exception:
        sys.modules["decord"] = types.ModuleType("decord")
        sys.modules["decord"].__spec__ = importlib.machinery.ModuleSpec("decord", None)


class _FP32Torch:
    """``torch`` with ``bfloat16`` = ``float32``: neutralises the official code's hard-coded bf16 casts."""

    bfloat16 = torch.float32

    def __getattr__(self, name):
        return getattr(torch, name)


def _default_rope(config, device=None, seq_len=None, **kw):
    """transformers 4.x ``_compute_default_rope_parameters`` (5.x dropped the "default" entry): plain RoPE."""
    base = getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dim = int(head_dim * getattr(config, "partial_rotary_factor", 1.0))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float().to(device) / dim))
    return inv_freq, 1.0


def patch_official() -> None:
    """fp32 casts, CPU SDPA and the transformers-5 RoPE table entry in the imported official modules."""
    import modeling.bagel.qwen2_navit as qn
    import modeling.bagel.siglip_navit as sn
    import modeling.qwen2.modeling_qwen2 as mq

    qn.torch = sn.torch = _FP32Torch()
    qn.sdpa_kernel = lambda *a, **k: contextlib.nullcontext()
    if "default" not in mq.ROPE_INIT_FUNCTIONS:
        mq.ROPE_INIT_FUNCTIONS = {**mq.ROPE_INIT_FUNCTIONS, "default": _default_rope}


# --- samples in the official datasets' formats ----------------------------------------------------------------------
class _WordTokenizer:
    """One random non-special id per whitespace-separated word: a text of n words is n tokens."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def encode(self, text: str) -> list[int]:
        return [self.rng.randrange(BOS) for _ in text.split()]


class _Transform:
    """What the official ``ImageTransform(size, size, stride)`` yields for our square images: size × size in [-1, 1]."""

    def __init__(self, size: int, stride: int):
        self.size, self.stride = size, stride

    def __call__(self, image: Image.Image, img_num: int = 1) -> torch.Tensor:
        img = image.resize((self.size, self.size), Image.BICUBIC)
        return torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0


def sample_streams(seed: int):
    """Infinite iterators of t2i / vlm / edit samples (the dicts the official datasets yield)."""
    from data.interleave_datasets.edit_dataset import UnifiedEditIterableDataset
    from data.vlm_dataset import SftJSONLIterableDataset

    rng = random.Random(seed)
    tok = _WordTokenizer(rng)
    vae_t, vit_t = _Transform(VAE_PX, 16), _Transform(VIT_PX, 14)

    def image() -> Image.Image:  # our synthetic shapes: square, 64–96 px
        s = rng.randint(64, 96)
        return Image.fromarray(np.random.randint(0, 256, (s, s, 3), dtype=np.uint8))

    def words(lo: int, hi: int) -> str:
        return " ".join(["w"] * rng.randint(lo, hi))

    def t2i():  # data/t2i_dataset.py T2IIterableDataset.__iter__, one row
        for i in iter(int, 1):
            image_tensor = vae_t(image())
            caption = tok.encode(words(10, 20))
            yield dict(
                image_tensor_list=[image_tensor],
                text_ids_list=[caption],
                num_tokens=image_tensor.shape[1] * image_tensor.shape[2] // 16**2 + len(caption),
                sequence_plan=[
                    dict(type="text", enable_cfg=1, loss=0, special_token_loss=0, special_token_label=None),
                    dict(type="vae_image", enable_cfg=0, loss=1, special_token_loss=0, special_token_label=None),
                ],
                data_indexes=dict(data_indexes=[0, 0, i], worker_id=0, dataset_name="t2i_pretrain"),
            )

    def vlm():  # data/vlm_dataset.py SftJSONLIterableDataset.__iter__, one jsonl line with one image
        for i in iter(int, 1):
            turns = [(words(5, 8), words(3, 6)) for _ in range(rng.randint(1, 3))]
            if rng.random() < 0.5:
                turns.append((words(4, 4), words(10, 20)))
            conv = []
            for t, (q, a) in enumerate(turns):
                conv += [{"from": "human", "value": ("<image>\n" if t == 0 else "") + q}, {"from": "gpt", "value": a}]
            image_tensor_list = [vit_t(image())]
            num_tokens = image_tensor_list[0].shape[1] * image_tensor_list[0].shape[2] // 14**2
            text_ids_list, sequence_plan = [], []
            for item in SftJSONLIterableDataset.change_format(None, dict(conversations=conv), 1):
                if item["type"] == "text":
                    ids = tok.encode(item["text"])
                    text_ids_list.append(ids)
                    num_tokens += len(ids)
                    loss, kind = item["has_loss"], "text"
                else:
                    loss, kind = 0, "vit_image"
                sequence_plan.append(
                    dict(type=kind, enable_cfg=0, loss=loss, special_token_loss=0, special_token_label=None)
                )
            yield dict(
                image_tensor_list=image_tensor_list,
                text_ids_list=text_ids_list,
                sequence_plan=sequence_plan,
                num_tokens=num_tokens,
                data_indexes=dict(data_indexes=i, worker_id=0, dataset_name="vlm_sft"),
            )

    def edit():  # data/interleave_datasets/edit_dataset.py parse_row on a row of 2–3 images
        ds = object.__new__(UnifiedEditIterableDataset)
        ds.tokenizer, ds.transform, ds.vit_transform = tok, vae_t, vit_t
        for i in iter(int, 1):
            n = rng.randint(2, 3)
            pngs = []
            for _ in range(n):
                buf = io.BytesIO()
                image().save(buf, format="PNG")
                pngs.append(buf.getvalue())
            row = dict(image_list=pngs, instruction_list=[[words(4, 9), words(4, 9)] for _ in range(n - 1)])
            data = ds.parse_row(row)
            data["data_indexes"] = dict(data_indexes=[0, i], worker_id=0, dataset_name="unified_edit")
            yield data

    streams = dict(t2i=t2i(), vlm=vlm(), edit=edit())
    return [streams[name] for name, _, _ in MIXTURE]


def make_packs(pack: int, count: int, seed: int) -> list[dict]:
    """``count`` packs of at most ``pack`` tokens from the official ``PackedDataset.__iter__`` (no files)."""
    from data.data_utils import get_flattened_position_ids_interpolate
    from data.dataset_base import DataConfig, PackedDataset

    random.seed(seed)
    np.random.seed(seed)  # pack_sequence draws the timesteps with np.random.randn
    ds = object.__new__(PackedDataset)
    ds.expected_num_tokens = ds.max_num_tokens = pack
    ds.max_num_tokens_per_sample = 16384
    ds.prefer_buffer_before = pack // 2  # the official 16384 of 32768
    ds.max_buffer_size = 50
    ds.use_flex = False
    ds.interpolate_pos = True
    ds.get_flattened_position_ids = get_flattened_position_ids_interpolate
    ds.bos_token_id, ds.eos_token_id, ds.start_of_image, ds.end_of_image = BOS, EOS, SOI, EOI
    ds.data_config = DataConfig(
        grouped_datasets={},
        text_cond_dropout_prob=0.1,
        vit_cond_dropout_prob=0.3,
        vae_cond_dropout_prob=0.3,
        vae_image_downsample=16,
        max_latent_size=16,
        vit_patch_size=14,
        max_num_patch_per_side=16,
    )
    ds.dataset_iters = sample_streams(seed)
    ds.grouped_weights = [w for _, w, _ in MIXTURE]
    ds.is_mandatory = [m for _, _, m in MIXTURE]
    it = iter(ds)
    with contextlib.redirect_stdout(io.StringIO()):  # "Yielding data with length ..."
        return [next(it) for _ in range(count)]


# --- model and step -------------------------------------------------------------------------------------------------
def build(hidden: int, layers: int, act_ckpt: bool, seed: int):
    from modeling.autoencoder import AutoEncoder, AutoEncoderParams
    from modeling.bagel import (
        Bagel,
        BagelConfig,
        Qwen2Config,
        Qwen2ForCausalLM,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    torch.manual_seed(seed)
    llm_config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        qk_norm=True,
        tie_word_embeddings=False,
        layer_module="Qwen2MoTDecoderLayer",
        freeze_und=False,
        pad_token_id=None,  # transformers 5 configs no longer define it; qwen2_navit reads it
    )
    language_model = Qwen2ForCausalLM(llm_config)
    language_model.init_moe()  # copy_init_moe=True
    vit_config = SiglipVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=16 * 14,
        patch_size=14,
        rope=False,
    )
    vit_model = SiglipVisionModel(vit_config)
    vae_config = AutoEncoderParams(
        resolution=256,
        in_channels=3,
        downsample=8,
        ch=32,
        out_ch=3,
        ch_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        z_channels=16,
        scale_factor=0.3611,
        shift_factor=0.1159,
    )
    vae = AutoEncoder(vae_config)
    config = BagelConfig(
        visual_gen=True,
        visual_und=True,
        llm_config=llm_config,
        vit_config=vit_config,
        vae_config=vae_config,
        latent_patch_size=2,
        max_latent_size=16,
        vit_max_num_patch_per_side=16,
        connector_act="gelu_pytorch_tanh",
        interpolate_pos=True,
        timestep_shift=3.0,
    )
    model = Bagel(language_model, vit_model, config)
    model.vit_model.vision_model.embeddings.convert_conv2d_to_linear(vit_config)
    for p in vae.parameters():  # freeze_vae=True
        p.requires_grad = False
    ema = copy.deepcopy(model)
    if act_ckpt:
        import functools

        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            CheckpointImpl,
            apply_activation_checkpointing,
            checkpoint_wrapper,
        )
        from train.fsdp_utils import grad_checkpoint_check_fn

        apply_activation_checkpointing(
            model,
            checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
            check_fn=grad_checkpoint_check_fn,
        )
    model.train()
    ema.eval()
    return model, ema, vae


def make_step(model, ema, vae, lr: float, ema_decay: float):
    from transformers.optimization import get_constant_schedule_with_warmup

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-15, weight_decay=0)
    scheduler = get_constant_schedule_with_warmup(optimizer=optimizer, num_warmup_steps=1)
    # fsdp_ema_update: the parameters that require grad (the fixed sin-cos tables do not); names match before any
    # activation-checkpoint wrapping renames the trained model's modules
    live = {n.replace("._checkpoint_wrapped_module", ""): p for n, p in model.named_parameters()}
    assert set(live) == {n for n, _ in ema.named_parameters()}
    pairs = [(e, live[n]) for n, e in ema.named_parameters() if live[n].requires_grad]
    ema_params, new_params = [e for e, _ in pairs], [p for _, p in pairs]

    def step(batch: dict) -> float:
        data = dict(batch)
        data.pop("batch_data_indexes", None)
        data.pop("ce_loss_weights", None)
        with torch.no_grad():
            data["padded_latent"] = vae.encode(data.pop("padded_images"))
        loss_dict = model(**data)
        ce = loss_dict["ce"].sum() / len(data["ce_loss_indexes"])
        mse = loss_dict["mse"].mean(dim=-1).sum() / len(data["mse_loss_indexes"])
        loss = ce + mse
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            torch._foreach_mul_(ema_params, ema_decay)
            torch._foreach_add_(ema_params, new_params, alpha=1 - ema_decay)
        optimizer.zero_grad()
        return float(loss.detach())

    return step


def time_steps(step, packs, warm_pass: bool = False) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of each step on ``packs[1:]`` after one warm-up step on ``packs[0]`` (with ``warm_pass``:
    ``packs[1:]`` also run once untimed first, as step_speed.py's ``--warm_pass``)."""
    wall, cpu = [], []
    if warm_pass:  # untimed: the one-time costs of the packs' first runs
        for batch in packs:
            step(batch)
    for i, batch in enumerate(packs):
        t, c = time.perf_counter(), time.process_time()
        loss = step(batch)
        if i:
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        if not np.isfinite(loss):
            raise RuntimeError(f"non-finite loss at step {i}")
    return wall, cpu


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--official_src", required=True, help="a checkout of github.com/ByteDance-Seed/Bagel")
    p.add_argument("--packs", default="1024,4096", help="max_num_tokens (= expected_num_tokens) of a pack")
    p.add_argument("--models", default="96x3,256x4,512x8", help="HIDDENxLAYERS, comma separated")
    p.add_argument("--steps", type=int, default=5, help="timed steps per case (after one warm-up)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--act_ckpt", action="store_true", help="activation checkpointing as the official trainer")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--warm_pass",
        action="store_true",
        help="steady state: run the timed packs once untimed after the warm-up, then time them",
    )
    p.add_argument("--out", default="", help="also write the table and raw numbers as JSON here")
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.official_src, "modeling", "bagel", "bagel.py")):
        p.error(f"--official_src: no modeling/bagel/bagel.py under {args.official_src}")
    packs = [int(x) for x in args.packs.split(",")]
    models = [tuple(int(v) for v in m.split("x")) for m in args.models.split(",")]
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5 on the official 4.x-era configs
    install_shims(args.official_src)
    patch_official()
    print(
        f"official BAGEL, torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, "
        f"act_ckpt={args.act_ckpt}; mean over {args.steps} packs after 1 warm-up pack"
        f"{' and a warm pass over them' if args.warm_pass else ''}",
        flush=True,
    )
    rows, raw = [], []
    for pack in packs:
        batches = make_packs(pack, args.steps + 1, args.seed)
        real = float(np.mean([b["sequence_length"] for b in batches[1:]]))
        docs = float(np.mean([len(b["sample_lens"]) for b in batches[1:]]))
        for hidden, layers in models:
            model, ema, vae = build(hidden, layers, args.act_ckpt, args.seed)
            wall, cpu = time_steps(make_step(model, ema, vae, args.lr, args.ema), batches, args.warm_pass)
            secs = float(np.mean(wall))
            del model, ema, vae
            raw.append(
                dict(
                    model=f"{hidden}x{layers}",
                    pack=pack,
                    real_tokens=real,
                    samples=docs,
                    step_s=wall,
                    step_cpu_s=cpu,
                    warm_pass=args.warm_pass,
                )
            )
            print(
                f"  {hidden}x{layers} pack={pack} ({real:.0f} real tokens, {docs:.1f} samples): {secs:.3f} s/step "
                f"({real / secs:.0f} tokens/s; {np.median(cpu):.3f} CPU s/step)",
                flush=True,
            )
            rows.append((hidden, layers, pack, real, secs, float(np.median(cpu))))
    lines = [
        "| model | pack (real tokens) | official s/step | official tokens/s | official CPU s/step |",
        "|---|---|---|---|---|",
    ]
    for hidden, layers, pack, real, secs, cpu in rows:
        lines.append(f"| {hidden}×{layers} | {pack} ({real:.0f}) | {secs:.3f} | {real / secs:.0f} | {cpu:.3f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(table=table, raw=raw, args=vars(args)), f, indent=1)


if __name__ == "__main__":
    main()
