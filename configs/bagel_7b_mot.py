"""The released BAGEL-7B-MoT shapes (Qwen2.5-7B MoT LLM, SigLIP so400m-14-980 with 26 layers, FLUX VAE).

Command (plan a pod before paying for it):
  python -m bagel_jax.aot --config=configs/bagel_7b_mot.py --topology=v5p:4x4x4
  python -m bagel_jax.aot --config=configs/bagel_7b_mot.py:45k --topology=v5p:4x4x4   # 45K-token rows
  (v6e, 32 GiB chips: configs/bagel_7b_mot_v6e.py)
Command (train / fine-tune; e.g. the reference's fine-tune recipe):
  python -m bagel_jax.train --config=configs/bagel_7b_mot.py --config.train.lr=2e-5 \
      --config.train.init_from=/ckpt/BAGEL-7B-MoT --workdir=gs://bucket/run
Expected: 14.14B LLM params (7B active per token), 32K-token rows; one row per chip fits v6e:8x8 (fsdp 64) with
          --config.model.remat=offload_input: 16.58 GiB of temporaries per chip (before this change:
          36.79; v5p: 4.26 arguments + 69.22 temporaries), see the README's AOT table.
"""

from bagel_jax.config import base_config


def get_config(arg=None):
    c = base_config()
    c.name = "bagel_7b_mot"
    # base_config() already holds the release shapes; stated here so the file reads as the spec.
    c.model.update(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        qk_norm=True,
        layer_module="mot",
        max_latent_size=64,
        vit_max_num_patch_per_side=70,
        dtype="bfloat16",
        remat="full",
        scan_layers=True,  # one compiled layer (compile minutes instead of tens); aot scales its FLOPs by 28
        ce_chunk=2048,  # [rows, 2048, 152064] f32 logits per chunk (1.2 GiB per row)
    )
    # image slots a few at a time: 3.4 instead of 28 GiB for 12 × 1024² per row; per_chip: each chip sorts its own
    # images and skips its own empty slots (same latents, compiled FLOPs and memory; docs/DESIGN_NOTES.md 55)
    # encode_levels=2: a chunk of images that all fit 512 on a side (or 512 × 1024) is encoded at that bucket
    # (v5p:4x4x4 32K: 3.80 + 23.16 GiB per chip; 23.78 GiB of temporaries with the global slot scan; README)
    c.model.vae.update(encode_scan=True, encode_scan_mode="per_chip", encode_levels=2)
    c.model.vit.update(hidden_size=1152, intermediate_size=4304, num_layers=26, num_heads=16, patch_size=14)
    c.model.vit.scan_layers = True  # one compiled SigLIP layer too
    # und ≈ 35% of the row fits the reference's t2i/vlm/edit mix (benchmarks/pack_fill.py: 97.4% fill; 45K: 97.8%)
    c.data.update(
        seq_len=32768,
        und_len=11520,
        gen_len=21248,
        max_vit_patches=11520,
        max_vae_images=12,
        vae_image_size=(1024, 1024),
        batch_size=64,
        # the LM head runs at <= 4096 label slots per row, not at all 11520 und slots (ViT patches, padding)
        max_labels_per_row=4096,
        pixel_dtype="uint8",  # 4x fewer host and input bytes; normalised on device
    )
    if arg == "45k":
        c.data.update(seq_len=45056, und_len=15872, gen_len=29184, max_vit_patches=15872, max_vae_images=16)
        c.data.max_labels_per_row = 5632
    elif arg not in (None, "", "32k"):
        raise ValueError(f"configs/bagel_7b_mot.py: unknown row length {arg!r} (use 32k or 45k)")
    c.parallel.update(data=1, fsdp=-1, tensor=1)
    return c
