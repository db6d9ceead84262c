"""Official release layout ⇄ params: key table vs §9.3, exact round trip, strict errors, config recovery."""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import bagel_testlib as lib
from bagel_jax.config import base_config
from bagel_jax.convert import bagel_ckpt as bc


def test_release_key_table_matches_section_9_3():
    """Key names/shapes of BAGEL-7B-MoT from the formulas, checked against numbers written in bagel.md §9.3."""
    shapes = bc.official_shapes(base_config().model)
    # 788 LM (2 + 2 norms + 28 layers × 28 MoT tensors) + 9 gen + 421 ViT (5 + 26 × 16) + 5 connector/pos
    assert len(shapes) == 1223
    want = {
        "language_model.model.embed_tokens.weight": (152064, 3584),
        "language_model.model.layers.27.self_attn.q_proj_moe_gen.weight": (3584, 3584),
        "language_model.model.layers.0.self_attn.k_proj.weight": (512, 3584),
        "language_model.model.layers.0.self_attn.v_proj_moe_gen.bias": (512,),
        "language_model.model.layers.3.self_attn.o_proj.weight": (3584, 3584),
        "language_model.model.layers.3.self_attn.q_norm_moe_gen.weight": (128,),
        "language_model.model.layers.5.mlp_moe_gen.gate_proj.weight": (18944, 3584),
        "language_model.model.layers.5.mlp.down_proj.weight": (3584, 18944),
        "language_model.model.layers.9.post_attention_layernorm_moe_gen.weight": (3584,),
        "language_model.model.norm_moe_gen.weight": (3584,),
        "language_model.lm_head.weight": (152064, 3584),
        "time_embedder.mlp.0.weight": (3584, 256),
        "time_embedder.mlp.2.weight": (3584, 3584),
        "vae2llm.weight": (3584, 64),
        "llm2vae.weight": (64, 3584),
        "llm2vae.bias": (64,),
        "latent_pos_embed.pos_embed": (4096, 3584),
        "vit_model.vision_model.embeddings.patch_embedding.weight": (1152, 588),
        "vit_model.vision_model.embeddings.position_embedding.weight": (4900, 1152),
        "vit_model.vision_model.encoder.layers.25.self_attn.out_proj.weight": (1152, 1152),
        "vit_model.vision_model.encoder.layers.0.mlp.fc1.weight": (4304, 1152),
        "vit_model.vision_model.encoder.layers.0.mlp.fc2.weight": (1152, 4304),
        "vit_model.vision_model.post_layernorm.bias": (1152,),
        "connector.fc1.weight": (3584, 1152),
        "connector.fc2.weight": (3584, 3584),
        "vit_pos_embed.pos_embed": (4900, 3584),
    }
    for key, shape in want.items():
        assert shapes[key] == shape, key
    assert "vit_model.vision_model.encoder.layers.26.mlp.fc1.weight" not in shapes  # 26 layers used
    assert not any("rotary_emb" in k for k in shapes)
    total = sum(math.prod(s) for s in shapes.values())
    assert 14.5e9 < total < 14.75e9, total  # ≈ 14.6B (§9.1: MoT LM 14.14B + ViT 0.40B + ≈ 0.06B)


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    cfg = lib.tiny_config().model
    d = str(tmp_path_factory.mktemp("release"))
    bc.write_random_checkpoint(d, cfg, seed=3)
    return cfg, d


def _assert_same_files(a_path, b_path):
    a, b = load_file(a_path), load_file(b_path)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k


def test_random_checkpoint_has_every_release_key(ckpt_dir):
    cfg, d = ckpt_dir
    sd = load_file(os.path.join(d, bc.EMA_FILE))
    assert dict((k, v.shape) for k, v in sd.items()) == bc.official_shapes(cfg)
    ae = load_file(os.path.join(d, bc.AE_FILE))
    assert sorted(ae) == sorted(bc.flux_ae_keys(cfg.vae))
    assert all(k.startswith(("encoder.", "decoder.")) for k in ae)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_round_trip_is_exact(ckpt_dir, tmp_path, scan_layers):
    cfg, d = ckpt_dir
    cfg = cfg.copy_and_resolve_references()
    cfg.scan_layers = cfg.vit.scan_layers = scan_layers  # both stacks scanned: LLM and SigLIP
    params = bc.load_params(d, cfg)
    if scan_layers:
        assert params["language_model"]["layers"]["mlp"]["up_proj"]["kernel"].shape[0] == cfg.num_layers
        assert params["vit_model"]["layers"]["mlp"]["fc1"]["kernel"].shape[0] == cfg.vit.num_layers
    bc.export_checkpoint(str(tmp_path), params, cfg, dtype="float32")
    _assert_same_files(os.path.join(d, bc.EMA_FILE), os.path.join(tmp_path, bc.EMA_FILE))
    _assert_same_files(os.path.join(d, bc.AE_FILE), os.path.join(tmp_path, bc.AE_FILE))
    for name in (bc.LLM_CONFIG, bc.VIT_CONFIG):
        with open(os.path.join(d, name)) as f1, open(os.path.join(tmp_path, name)) as f2:
            assert json.load(f1) == json.load(f2)


def test_round_trip_bf16_and_sharded(ckpt_dir, tmp_path):
    """A bf16 release split over two shards with an index: loads (streamed per shard), exports bit-exactly."""
    cfg, d = ckpt_dir
    sd = {k: v.astype("bfloat16") for k, v in load_file(os.path.join(d, bc.EMA_FILE)).items()}
    keys = sorted(sd)
    shards = {"ema-00001-of-00002.safetensors": keys[::2], "ema-00002-of-00002.safetensors": keys[1::2]}
    src = tmp_path / "src"
    src.mkdir()
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(src / name))
    with open(src / "ema.safetensors.index.json", "w") as fh:
        json.dump({"weight_map": {k: name for name, ks in shards.items() for k in ks}}, fh)
    seen = []
    params = bc.load_params(
        str(src), cfg, ae_path=os.path.join(d, bc.AE_FILE), place=lambda path, a: seen.append("/".join(path)) or a
    )
    assert len(seen) == len(sd) + len(bc.flux_ae_keys(cfg.vae))  # every tensor handed over as it is read
    out = bc.params_to_state_dict(params, cfg, dtype="bfloat16")
    assert sorted(out) == keys
    for k in keys:
        assert out[k].dtype == sd[k].dtype and out[k].tobytes() == sd[k].tobytes(), k


def _rewrite(src_dir, dst_dir, edit):
    os.makedirs(dst_dir, exist_ok=True)
    for name in os.listdir(src_dir):
        data = open(os.path.join(src_dir, name), "rb").read()
        open(os.path.join(dst_dir, name), "wb").write(data)
    sd = load_file(os.path.join(src_dir, bc.EMA_FILE))
    save_file(edit(dict(sd)), os.path.join(dst_dir, bc.EMA_FILE))


def test_renamed_key_fails_naming_it(ckpt_dir, tmp_path):
    cfg, d = ckpt_dir
    key = "language_model.model.layers.1.self_attn.k_norm_moe_gen.weight"

    def rename(sd):
        sd["language_model.model.layers.1.self_attn.k_norm_gen.weight"] = sd.pop(key)
        return sd

    _rewrite(d, str(tmp_path / "renamed"), rename)
    with pytest.raises(bc.CheckpointError, match=key.replace(".", r"\.")):
        bc.load_params(str(tmp_path / "renamed"), cfg)

    def extra(sd):
        sd["vit_model.vision_model.head.probe"] = np.zeros(3, np.float32)
        return sd

    _rewrite(d, str(tmp_path / "extra"), extra)
    with pytest.raises(bc.CheckpointError, match=r"vit_model\.vision_model\.head\.probe: unexpected"):
        bc.load_params(str(tmp_path / "extra"), cfg)

    def reshape(sd):
        sd["connector.fc1.weight"] = sd["connector.fc1.weight"][:, :-1]
        return sd

    _rewrite(d, str(tmp_path / "shape"), reshape)
    msg = r"connector\.fc1\.weight: expected shape \(64, 32\), found \(64, 31\)"
    with pytest.raises(bc.CheckpointError, match=msg):
        bc.load_params(str(tmp_path / "shape"), cfg)


def test_config_recovered_from_the_release_files(ckpt_dir):
    cfg, d = ckpt_dir
    got = bc.config_from_checkpoint(d, base_config().model)
    for k in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "rope_theta",
        "layer_module",
        "qk_norm",
        "max_latent_size",
        "vit_max_num_patch_per_side",
        "visual_gen",
        "visual_und",
        "tie_word_embeddings",
    ):
        assert got[k] == cfg[k], k
    assert got.vit.to_dict() == cfg.vit.to_dict()
    for k in ("ch", "num_res_blocks", "z_channels"):
        assert got.vae[k] == cfg.vae[k], k
    assert tuple(got.vae.ch_mult) == tuple(cfg.vae.ch_mult)
    with open(os.path.join(d, bc.VIT_CONFIG)) as fh:
        assert json.load(fh)["num_hidden_layers"] == cfg.vit.num_layers + 1  # the reference drops the last


def test_loaded_params_fit_the_model(ckpt_dir):
    """The loaded tree has exactly the structure and shapes ``Bagel.init`` creates (abstract init), and every
    initialised parameter carries logical axis names."""
    import flax.linen as nn

    from bagel_jax.model.bagel import make_init_fn

    cfg, d = ckpt_dir
    params = bc.load_params(d, cfg)
    _, init_fn = make_init_fn(lib.tiny_config())
    boxed = jax.eval_shape(init_fn, jax.random.key(0))
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert all(isinstance(x, nn.Partitioned) and len(x.names) == x.value.ndim for x in leaves)
    want = jax.tree.map(lambda x: tuple(x.shape), nn.unbox(boxed))
    assert jax.tree.map(lambda x: tuple(x.shape), params) == want


def test_understanding_only_checkpoint(tmp_path):
    """visual_gen=False (the reference's VLM eval model): no gen keys, no ae.safetensors, config says so."""
    cfg = lib.tiny_config().model
    cfg.visual_gen = False
    bc.write_random_checkpoint(str(tmp_path), cfg, seed=1)
    assert not (tmp_path / bc.AE_FILE).exists()
    keys = set(bc.official_shapes(cfg))
    assert not keys & {"vae2llm.weight", "llm2vae.bias", "latent_pos_embed.pos_embed", "time_embedder.mlp.0.weight"}
    got_cfg, params = bc.load_checkpoint(str(tmp_path), lib.tiny_config().model)
    assert got_cfg.visual_gen is False and got_cfg.visual_und is True
    assert "vae" not in params and "vit_model" in params
