"""Shared helpers for the data tests: one shapes dataset per test session, the tiny config, row invariants."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile

import numpy as np

from bagel_jax.attention.mask import MaskMeta, allowed
from bagel_jax.batch import KIND_CLEAN_VAE, KIND_NOISED_VAE, KIND_PAD, KIND_TEXT, KIND_VIT
from configs_util import shipped_config

SHAPES_EXAMPLES = 40  # per split


@functools.cache
def shapes_dir() -> str:
    """A synthetic_shapes data_dir built once per test process (seed 0, 40 examples per split)."""
    from bagel_jax.data.builders import synthetic_shapes

    d = tempfile.mkdtemp(prefix="shapes_")
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    synthetic_shapes.build(d, num_examples=SHAPES_EXAMPLES, seed=0)
    return d


def tiny_config(data_dir: str | None = None, **data):
    c = shipped_config("tiny")
    c.data.data_dir = data_dir or shapes_dir()
    c.data.num_workers = 0
    c.data.update(data)
    return c


def as_dict(batch) -> dict:
    return batch if isinstance(batch, dict) else batch.to_dict()


def check_rows(batch, und_len: int, max_latent_size: int, max_vit_side: int, docs_per_row=None) -> None:
    """Asserts the PackedBatch invariants on every row (see bagel_jax/batch.py). With ``docs_per_row`` (the
    Documents of each row) also checks positions and the mask against the reference's dense mask per document."""
    b = as_dict(batch)
    B, L = b["kind"].shape
    U, _G = und_len, L - und_len
    N, H, W = b["vae_images"].shape[1:4]
    Wl, T = W // 16, (H // 16) * (W // 16)
    for r in range(B):
        kind, index = b["kind"][r], b["index"][r]
        und, gen = kind[:U], kind[U:]
        assert set(np.unique(und)) <= {KIND_PAD, KIND_TEXT, KIND_VIT}
        assert set(np.unique(gen)) <= {KIND_PAD, KIND_CLEAN_VAE, KIND_NOISED_VAE}
        nu, ng = int((und != 0).sum()), int((gen != 0).sum())
        assert (und[:nu] != 0).all() and (gen[:ng] != 0).all(), "padding must follow the real tokens"
        assert ((b["doc"][r] == 0) == (kind == 0)).all()
        # index: a permutation, increasing within each region; slots disjoint
        assert sorted(index.tolist()) == list(range(L))
        assert (np.diff(index[:U]) > 0).all() and (np.diff(index[U:]) > 0).all()
        meta = MaskMeta(*(np.asarray(b[k][r]) for k in ("doc", "index", "q_hi", "kv_hi")))
        dense = np.asarray(allowed(meta))
        real = kind != 0
        assert dense[real, real].all(), "every real token attends to itself"
        assert not dense[~real].any() and not dense[:, ~real].any()
        same_doc = b["doc"][r][:, None] == b["doc"][r][None, :]
        assert not (dense & ~same_doc).any()
        # text, labels aligned with the next natural token
        text_ids, labels, ce = b["text_ids"][r], b["labels"][r], b["ce_weight"][r]
        assert (text_ids[und != KIND_TEXT] == 0).all()
        assert (labels[ce == 0] == 0).all() and (ce >= 0).all()
        slot_of = np.empty(L, np.int64)
        slot_of[index] = np.arange(L)
        for s in np.nonzero(ce > 0)[0]:
            nxt = slot_of[index[s] + 1]
            assert nxt < U and kind[nxt] == KIND_TEXT and b["doc"][r][nxt] == b["doc"][r][s]
            assert labels[s] == text_ids[nxt]
        # ViT patches -> their und slots
        vit_image, vit_slot = b["vit_image"][r], b["vit_slot"][r]
        real_p = vit_image > 0
        assert real_p.sum() == (und == KIND_VIT).sum()
        assert sorted(vit_slot[real_p].tolist()) == np.nonzero(und == KIND_VIT)[0].tolist()
        assert (vit_slot[~real_p] == U).all() and not b["vit_patches"][r][~real_p].any()
        assert (np.diff(vit_image[real_p]) >= 0).all() and (b["vit_pos"][r][real_p] < max_vit_side**2).all()
        assert np.abs(b["vit_patches"][r]).max(initial=0) <= 1.0
        # VAE latent tokens -> distinct (image, row, col) inside the image's valid size
        src = b["vae_src"][r][:ng]
        assert len(set(src.tolist())) == ng
        n, rc = np.divmod(src, T)
        rr, cc = np.divmod(rc, Wl)
        hw = b["vae_hw"][r]
        assert (hw[n] > 0).all() and (rr < hw[n, 0] // 16).all() and (cc < hw[n, 1] // 16).all()
        used = np.unique(n)
        for k in used:
            assert (n == k).sum() == (hw[k, 0] // 16) * (hw[k, 1] // 16), "every latent of a used image is placed"
            noised = np.isfinite(b["vae_timestep"][r][k])
            assert (gen[:ng][n == k] == (KIND_NOISED_VAE if noised else KIND_CLEAN_VAE)).all()
            assert len(set(b["position"][r][U : U + ng][n == k].tolist())) == 1, "one RoPE id per image"
            img = b["vae_images"][r][k]
            assert not img[hw[k, 0] :].any() and not img[:, hw[k, 1] :].any()
        unused = np.setdiff1d(np.arange(N), used)
        assert not hw[unused].any() and not b["vae_images"][r][unused].any()
        assert np.isneginf(b["vae_timestep"][r][unused]).all()
        np.testing.assert_array_equal(b["vae_pos"][r][:ng], rr * max_latent_size + cc)
        if docs_per_row is not None:
            _check_docs(b, r, docs_per_row[r], slot_of, dense)


def _check_docs(b, r, docs, slot_of, dense):
    """Each document's tokens (natural order) carry its kinds, positions, and the reference's mask."""
    nat0 = 0
    for d, doc in enumerate(docs, start=1):
        slots = slot_of[nat0 : nat0 + doc.num_tokens]
        assert (b["doc"][r][slots] == d).all()
        assert b["kind"][r][slots].tolist() == doc.kinds().tolist()
        assert b["position"][r][slots].tolist() == doc.positions().tolist()
        ref = reference_dense_mask(doc.split_lens.tolist(), list(doc.split_modes))
        np.testing.assert_array_equal(dense[np.ix_(slots, slots)], ref)
        assert b["records"][r][d - 1] == doc.key if "records" in b else True
        nat0 += doc.num_tokens
    assert (b["doc"][r] <= len(docs)).all()


def reference_dense_mask(split_lens, attn_modes):
    """``prepare_attention_mask_per_sample`` from the reference (data/data_utils.py), as booleans."""
    n = sum(split_lens)
    m = np.zeros((n, n), bool)
    s0 = 0
    for s, mode in zip(split_lens, attn_modes):
        m[s0 : s0 + s, :s0] = True
        m[s0 : s0 + s, s0 : s0 + s] = np.tril(np.ones((s, s), bool)) if mode == "causal" else True
        s0 += s
    s0 = 0
    for s, mode in zip(split_lens, attn_modes):
        if mode == "noise":
            m[:, s0 : s0 + s] = False
            m[s0 : s0 + s, s0 : s0 + s] = True
        s0 += s
    return m


def moving_square_frames(n: int, w: int = 64, h: int = 48, shots: int = 1) -> list:
    """``n`` uint8 RGB frames [h, w, 3]: a white square moving right on a background whose colour changes with each
    of ``shots`` equal shots (a hard cut between them)."""
    colours = [(200, 40, 40), (30, 160, 60), (40, 60, 200), (200, 200, 40)]
    out = []
    for i in range(n):
        a = np.zeros((h, w, 3), np.uint8)
        a[:] = colours[(i * shots // n) % len(colours)]
        x = (2 * i) % (w - 16)
        a[h // 4 : h // 4 + 16, x : x + 16] = 255
        out.append(a)
    return out


def write_video(path, frames, codec: str = "libx264", fps: int = 10, gop: int = 12) -> None:
    """Encodes uint8 RGB ``frames`` into ``path`` (container from the extension) with PyAV."""
    import av

    h, w = frames[0].shape[:2]
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt, s.gop_size = w, h, "yuv420p", gop
        if codec == "libx264":
            s.options = {"crf": "12", "preset": "ultrafast"}
        for a in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def bad_videos(folder, good) -> dict[str, str]:
    """Writes one bad video per build skip reason into ``folder`` (from the bytes of a ``good`` mkv file);
    returns ``{file name: reason}``."""
    import av

    folder.mkdir(parents=True, exist_ok=True)
    data = good.read_bytes()
    (folder / "truncated.mkv").write_bytes(data[: len(data) // 2])
    (folder / "not_a_video.mp4").write_bytes(b"\x00\x01 this is not a video " * 50)
    (folder / "unknown_codec.mkv").write_bytes(data.replace(b"V_MPEG4/ISO/AVC", b"V_QQQQQ/ISO/AVC"))
    with av.open(str(folder / "no_frames.mp4"), "w") as c:
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        c.start_encoding()
    write_video(folder / "huge.mkv", [np.zeros((16, 9000, 3), np.uint8)] * 2)
    return {
        "truncated.mkv": "undecodable_video",
        "not_a_video.mp4": "undecodable_video",
        "unknown_codec.mkv": "unsupported_codec",
        "no_frames.mp4": "no_frames",
        "huge.mkv": "video_too_large",
    }
