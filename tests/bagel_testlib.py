"""Shared helpers for the Bagel assembly / inference / checkpoint tests (not a test module)."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from bagel_jax.batch import PackedBatch
from bagel_jax.convert import bagel_ckpt
from bagel_jax.data.pack import Budgets, assemble, split_extras
from bagel_jax.data.sample import Image, LayoutConfig, Sample, Text, build_document
from bagel_jax.model.vae import FluxVAE
from configs_util import shipped_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOS, EOS, VS, VE = 2, 3, 4, 5


def tiny_config():
    return shipped_config("tiny")


def layout(cfg, vae_hw=(48, 48)) -> LayoutConfig:
    return LayoutConfig(
        bos_id=BOS,
        eos_id=EOS,
        vision_start_id=VS,
        vision_end_id=VE,
        vit_patch_size=cfg.vit.patch_size,
        vit_max_patches_per_side=cfg.vit_max_num_patch_per_side,
        vae_downsample=8 * cfg.latent_patch_size,
        max_latent_size=cfg.max_latent_size,
        vae_pad_hw=tuple(vae_hw),
    )


def budgets(seq_len=256, und_len=192, max_vit_patches=32, max_vae_images=6, vae_hw=(48, 48), max_docs=8) -> Budgets:
    return Budgets(
        seq_len=seq_len,
        und_len=und_len,
        max_vit_patches=max_vit_patches,
        max_vae_images=max_vae_images,
        vae_hw=tuple(vae_hw),
        vit_patch_dim=14 * 14 * 3,
        max_docs=max_docs,
    )


def pixels(rng, h, w):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def four_samples(seed=0) -> list[Sample]:
    """A T2I, a VLM, an editing and an interleaved sample (tiny images, random pixels and ids)."""
    rng = np.random.default_rng(seed)
    ids = lambda n: rng.integers(6, 500, n).tolist()  # noqa: E731
    t2i = Sample([Text(ids(5), cfg=True), Image(vae="noised", vae_pixels=pixels(rng, 32, 48))], key=1, kind="t2i")
    vlm = Sample(
        [Image(vit=True, vit_pixels=pixels(rng, 28, 42)), Text(ids(4)), Text(ids(6), loss=True)], key=2, kind="vlm"
    )
    src = pixels(rng, 32, 32)
    edit = Sample(
        [
            Image(vae="clean", vit=True, cfg=True, vae_pixels=src, vit_pixels=pixels(rng, 28, 28)),
            Text(ids(3), cfg=True),
            Image(vae="noised", vae_pixels=pixels(rng, 32, 32)),
        ],
        key=3,
        kind="edit",
    )
    inter = Sample(
        [
            Text(ids(4)),
            Image(vae="noised+clean", vit=True, vae_pixels=pixels(rng, 32, 32), vit_pixels=pixels(rng, 28, 28)),
            Text(ids(5), loss=True),
            Image(vae="noised", vae_pixels=pixels(rng, 48, 32)),
        ],
        key=4,
        kind="web",
    )
    return [t2i, vlm, edit, inter]


def documents(samples, lay, seed=0):
    rng = np.random.default_rng(seed)
    return [build_document(s, lay, rng) for s in samples]


def packed_batch(rows_of_docs, b: Budgets) -> PackedBatch:
    fields, _ = split_extras(assemble(rows_of_docs, b))
    return PackedBatch(**{k: jnp.asarray(v) for k, v in fields.items()})


def image_noise(docs_per_row, b: Budgets, z_channels=16, patch=2, seed=0):
    """Per-image posterior / flow noise at each image's own size, and the same noise in packed layout.

    Returns (per_doc list of (posterior list, flow list), packed dict(posterior [R,N,H/8,W/8,C], flow [R,N,T,p²C])).
    """
    rng = np.random.default_rng(seed + 100)
    hh, ww = b.vae_hw
    rows = len(docs_per_row)
    post = np.zeros((rows, b.max_vae_images, hh // 8, ww // 8, z_channels), np.float32)
    flow = np.zeros((rows, b.max_vae_images, b.latent_tokens_per_image, patch * patch * z_channels), np.float32)
    grid_w = ww // (8 * patch)
    per_doc = []
    for r, docs in enumerate(docs_per_row):
        i = 0
        for doc in docs:
            posts, flows = [], []
            for px in doc.vae_pixels:
                h, w = px.shape[:2]
                ez = rng.standard_normal((h // 8, w // 8, z_channels)).astype(np.float32)
                hl, wl = h // (8 * patch), w // (8 * patch)
                ef = rng.standard_normal((hl * wl, patch * patch * z_channels)).astype(np.float32)
                post[r, i, : h // 8, : w // 8] = ez
                rr, cc = np.divmod(np.arange(hl * wl), wl)
                flow[r, i, rr * grid_w + cc] = ef
                posts.append(ez), flows.append(ef)
                i += 1
            per_doc.append((posts, flows))
    return per_doc, dict(posterior=jnp.asarray(post), flow=jnp.asarray(flow))


@functools.cache
def _vae_encoder(vae_cfg_json: str):
    import ml_collections

    cfg = ml_collections.ConfigDict(__import__("json").loads(vae_cfg_json))
    cfg.ch_mult = tuple(cfg.ch_mult)
    vae = FluxVAE(cfg)
    return jax.jit(lambda p, x: vae.apply({"params": p}, x, method="encode"))


def vae_encode_fn(cfg, vae_params):
    """Oracle VAE: each image alone at its own size, no padding."""
    enc = _vae_encoder(cfg.vae.to_json())
    return lambda img: enc(vae_params, jnp.asarray(img))


def official_sd(params, cfg):
    return bagel_ckpt.params_to_state_dict(params, cfg, dtype="float32")


def slots_of(batch: PackedBatch, row: int, doc: int):
    """(und slots, gen slot offsets) of document ``doc`` in ``row``, each sorted by natural index."""
    u = batch.und_len
    kind_doc = np.asarray(batch.doc[row])
    index = np.asarray(batch.index[row])
    und = np.nonzero(kind_doc[:u] == doc)[0]
    gen = np.nonzero(kind_doc[u:] == doc)[0]
    return und[np.argsort(index[und])], gen[np.argsort(index[u + gen])]


@functools.cache
def tiny_setup():
    """(config, model cfg, params, Bagel) for a random release-layout checkpoint at configs/tiny.py shapes (cached)."""
    import tempfile

    from bagel_jax.model.bagel import Bagel

    config = tiny_config()
    cfg = config.model
    d = tempfile.mkdtemp(prefix="bagel_tiny_ckpt_")
    bagel_ckpt.write_random_checkpoint(d, cfg, seed=0)
    params = bagel_ckpt.load_params(d, cfg)
    return config, cfg, params, Bagel(cfg, ce_chunk=64)


@functools.cache
def packed_four():
    """The four-sample row, its documents, noise, and Bagel's outputs on it (cached; one compile)."""
    config, cfg, params, model = tiny_setup()
    lay, b = layout(cfg), budgets()
    docs = documents(four_samples(), lay)
    batch = packed_batch([docs], b)
    per_doc, noise = image_noise([docs], b)
    fwd = jax.jit(lambda p, bt, n: model.apply({"params": p}, bt, noise=n, return_logits=True))
    out = jax.device_get(fwd(params, batch, noise))
    return docs, batch, per_doc, noise, out


@functools.cache
def oracle_four():
    """The unpacked oracle's outputs on each of ``packed_four``'s samples alone, same noise (cached)."""
    from bagel_jax.model.unpacked import unpacked_forward

    config, cfg, params, model = tiny_setup()
    docs, batch, per_doc, noise, out = packed_four()
    sd = official_sd(params, cfg)
    encode = vae_encode_fn(cfg, params["vae"])
    return [
        unpacked_forward(sd, cfg, doc, vae_encode=encode, posterior_noise=posts, flow_noise=flows)
        for doc, (posts, flows) in zip(docs, per_doc)
    ]


class CharTokenizer:
    """Minimal tokenizer for tests: one id per character (6 + ord % 400), the special ids above."""

    bos_id, eos_id, vision_start_id, vision_end_id = BOS, EOS, VS, VE

    def encode(self, text):
        return [6 + (ord(c) % 400) for c in text]

    def decode(self, ids):
        return "".join(chr(int(i) - 6) for i in ids)


def runs_per_setting(cfg, params, batch, noise, key: str, values) -> dict:
    """{value: (scalar, outputs, grads)}: a jitted value_and_grad of Bagel (fp32, ce_chunk 64) on ``batch`` with
    ``cfg[key] = value``; the scalar sums the CE and the squared velocity predictions, so every branch gets grads."""
    from bagel_jax.model.bagel import Bagel

    runs = {}
    for value in values:
        c = cfg.copy_and_resolve_references()
        c[key] = value
        model = Bagel(c, ce_chunk=64)

        def scalar(p, model=model):
            o = model.apply({"params": p}, batch, noise=noise)
            return (o["ce"] * (o["ce"] > 0)).sum() + (o["velocity_pred"] ** 2).mean(), o

        (v, o), grads = jax.jit(jax.value_and_grad(scalar, has_aux=True))(params)
        runs[value] = v, o, grads
    return runs


def assert_same_run(want, got, grads_named: str) -> int:
    """Equal scalar, outputs (1e-5) and gradients (1e-6 abs, 1e-5 rel) of two ``runs_per_setting`` entries; returns
    how many gradient leaves whose path contains ``grads_named`` are non-zero (the caller checks they were reached)."""
    (v0, o0, g0), (v1, o1, g1) = want, got
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-6)
    for key in ("velocity_pred", "ce"):
        np.testing.assert_allclose(np.asarray(o1[key]), np.asarray(o0[key]), atol=1e-5, rtol=1e-5, err_msg=key)
    reached = 0
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g0), jax.tree.leaves(g1)):
        name = jax.tree_util.keystr(path)
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6, rtol=1e-5, err_msg=name)
        reached += (grads_named in name) and bool(np.any(np.asarray(a)))
    return reached
