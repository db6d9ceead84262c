"""Fine-tune the released BAGEL-7B-MoT with the reference's recipe (full fine-tune); ``:lora`` trains adapters only.

Commands (the release folder as downloaded: ema.safetensors, ae.safetensors, llm_config.json, vit_config.json and
its tokenizer, which the run then uses; your data built with bagel_jax.data.builders.{t2i,vlm_sft,edit}):
  python -m bagel_jax.train --config=configs/finetune_bagel_7b.py --config.train.init_from=/ckpt/BAGEL-7B-MoT \
      --config.data.data_dir=/data/tfds --workdir=/runs/bagel_ft
  python -m bagel_jax.train --config=configs/finetune_bagel_7b.py:lora --config.train.init_from=/ckpt/BAGEL-7B-MoT \
      --config.data.data_dir=/data/tfds --workdir=/runs/bagel_lora
  python -m bagel_jax.aot --config=configs/finetune_bagel_7b.py --topology=v5p:2x2x1
  python -m bagel_jax.aot --config=configs/finetune_bagel_7b.py:lora --topology=v6e:2x4
Expected: the release's params at step 0; the AOT table (slices, rows per chip, HBM) is in the README section
          "Fine-tune the release".

Values, and where they come from (the official repo, ByteDance-Seed/Bagel):
  TRAIN.md "Fine-tuning": lr 2e-5, max_latent_size 64 ("to ensure the correct pretrained weights are loaded"),
      finetune_from_ema (the release's ema.safetensors: our loader reads it before model.safetensors),
      expected_num_tokens 10240 / max_num_tokens 11520 / max_num_tokens_per_sample 10240 (→ 11520-token rows),
      log_every 1 (we keep 10: one host round-trip per step is the cost).
  train/pretrain_unified_navit.py defaults TRAIN.md does not override: warmup_steps 2000, constant schedule,
      AdamW betas (0.9, 0.95), eps 1e-15, no weight decay, max_grad_norm 1.0, ema 0.9999, save_every 2000,
      freeze_vae True / freeze_llm False / freeze_vit False (nothing but the VAE frozen), timestep_shift 1.0,
      CFG dropout text 0.1 / ViT 0.3 / VAE 0.3, global_seed 4396, data_seed 42; 8 GPUs × one pack each →
      8 rows per step.
  data/configs/example.yaml: ViT resize (980, 378, 14) for VLM (max 2,007,040 pixels), (518, 224, 14) for edit.
  ours: und/gen split 4096/7424 of the 11520 slots (≈ the 35 % und of configs/bagel_7b_mot.py), scan over
      layers (a 7B compile in minutes), remat full.
  :lora (no reference recipe; PEFT-style): rank 16, alpha 16 on q/k/v/o and the MLPs of both experts, base frozen,
      lr 1e-4 (the reference's pretraining lr: adapters start at zero and need a larger step than full weights).
"""

from bagel_jax.config import base_config


def get_config(arg=None):
    c = base_config()
    c.name = "finetune_bagel_7b"
    # the release's shapes (base_config() holds them; stated so the file reads as the spec)
    c.model.update(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        qk_norm=True,
        layer_module="mot",
        max_latent_size=64,
        vit_max_num_patch_per_side=70,
        dtype="bfloat16",
        remat="full",
        scan_layers=True,
    )
    c.model.vae.update(encode_scan=True, encode_scan_mode="per_chip", encode_levels=2)  # as configs/bagel_7b_mot.py
    c.model.vit.update(hidden_size=1152, intermediate_size=4304, num_layers=26, num_heads=16, patch_size=14)
    c.data.update(
        seq_len=11520,
        und_len=4096,
        gen_len=7424,
        max_vit_patches=4096,
        max_vae_images=6,
        vae_image_size=(1024, 1024),
        batch_size=8,
        builder="",
        seed=42,
    )
    c.data.sources.update(t2i="t2i", vlm="vlm_sft", edit="edit")
    c.data.vit_transform_by_kind.update(vlm=(980, 378, 14, 2_007_040), edit=(518, 224, 14))
    c.train.update(
        lr=2e-5,
        warmup_steps=2000,
        schedule="constant",
        beta1=0.9,
        beta2=0.95,
        eps=1e-15,
        weight_decay=0.0,
        max_grad_norm=1.0,
        ema_decay=0.9999,
        checkpoint_every=2000,
        freeze=(),
        seed=4396,
    )
    c.parallel.update(data=1, fsdp=-1, tensor=1)
    if arg == "lora":
        c.name = "finetune_bagel_7b_lora"
        c.model.lora.update(rank=16, alpha=16.0, experts=("und", "gen"), targets=("q", "k", "v", "o", "mlp"))
        c.train.lr = 1e-4
    elif arg not in (None, "", "full"):
        raise ValueError(f"configs/finetune_bagel_7b.py: unknown variant {arg!r} (use full or lora)")
    return c
