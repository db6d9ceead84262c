"""Packing fill: how full our rows are for a realistic BAGEL mix, next to the reference packer on the same stream.

Mix (equal sample weights, like the reference's example.yaml), token counts from the reference resize rules:
* T2I   image sides uniform in [512, 1024] px, VAE rule (1024, 512, 16) → (H/16)(W/16) gen tokens;
        caption 20–200 tokens (+2 text specials, +2 vision markers).
* VLM   image sides uniform in [224, 980] px, ViT rule (980, 378, 14, max_pixels 2_007_040) → patches (+2 markers);
        1–3 turns, question 10–80 tokens, answer 20–400 tokens (+2 specials per text).
* Edit  image sides uniform in [512, 1024] px: clean VAE (1024, 512, 16) + ViT (518, 224, 14) of the source,
        instruction 8–60 tokens, noised VAE target of the same size.

Ours: ``RowPacker`` (buffer of ``--buffer`` documents; each row starts with the oldest and is filled greedily with
one-step lookahead) filling und slots [0, U) and gen slots [U, L). U is the mix's mean und share of L, rounded to
256 (a TPU-friendly multiple), so neither region starves.
Reference: ``PackedDataset.__iter__`` (expected 32768 / max 36864 tokens, buffer 50, prefer_buffer_before 16384,
max 16384 tokens per sample) — fill measured against its 36864-token rows, and at 45056 with expected 40960.

    python benchmarks/pack_fill.py [--docs 20000] [--buffer 64]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from bagel_jax.data.images import ResizeRule
from bagel_jax.data.pack import RowPacker

VAE = ResizeRule(1024, 512, 16)
VIT_EDIT = ResizeRule(518, 224, 14)
VIT_VLM = ResizeRule(980, 378, 14, 2_007_040)


def _tokens(rule: ResizeRule, w: int, h: int) -> int:
    nw, nh = rule.target_size(w, h)
    return (nw // rule.stride) * (nh // rule.stride)


def sample_costs(n: int, seed: int = 0) -> np.ndarray:
    """int64[n, 5]: und tokens, gen tokens, ViT patches, VAE images, 1 (documents) for the mix above."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, 5), np.int64)
    out[:, 4] = 1
    for i in range(n):
        kind = rng.integers(3)
        if kind == 0:  # T2I
            w, h = rng.integers(512, 1025, size=2)
            out[i, :4] = (int(rng.integers(20, 201)) + 2 + 2, _tokens(VAE, w, h), 0, 1)
        elif kind == 1:  # VLM
            w, h = rng.integers(224, 981, size=2)
            patches = _tokens(VIT_VLM, w, h)
            turns = rng.integers(1, 4)
            text = sum(int(rng.integers(10, 81)) + 2 + int(rng.integers(20, 401)) + 2 for _ in range(turns))
            out[i, :4] = (patches + 2 + text, 0, patches, 0)
        else:  # edit
            w, h = rng.integers(512, 1025, size=2)
            vae, vit = _tokens(VAE, w, h), _tokens(VIT_EDIT, w, h)
            out[i, :4] = (2 + vit + 2 + int(rng.integers(8, 61)) + 2 + 2, 2 * vae, vit, 2)
    return out


def ours(costs: np.ndarray, seq_len: int, und_len: int, max_vae_images: int, buffer: int) -> dict:
    cap = np.array([und_len, seq_len - und_len, und_len, max_vae_images, 512], np.int64)
    packer = RowPacker(cap, buffer)
    rows, dropped = [], 0
    for i, c in enumerate(costs):
        if not packer.fits_empty(c):
            dropped += 1
            continue
        rows.extend(packer.add(i, c))
    used = np.array([costs[r].sum(0) for r in rows])
    return dict(rows=len(rows), dropped=dropped, und=used[:, 0].sum() / (len(rows) * und_len),
                gen=used[:, 1].sum() / (len(rows) * (seq_len - und_len)),
                all=(used[:, 0] + used[:, 1]).sum() / (len(rows) * seq_len))


def reference(costs: np.ndarray, expected: int, max_tokens: int, per_sample: int = 16384,
              prefer_buffer_before: int = 16384, max_buffer: int = 50) -> dict:
    """The reference ``PackedDataset`` loop (no mandatory groups; each sample's 2 tokens per plan item are in
    the costs already)."""
    totals = costs[:, 0] + costs[:, 1]
    packs, buffer, curr, i = [], [], 0, 0
    while i < len(totals):
        if curr < prefer_buffer_before and buffer:
            n, from_buffer = buffer.pop(0), True
        else:
            n, from_buffer = int(totals[i]), False
            i += 1
        if n > per_sample:
            continue
        if curr + n > max_tokens:
            if len(buffer) < max_buffer and not from_buffer:
                buffer.append(n)
            else:
                packs.append(curr)
                curr = 0
            continue
        curr += n
        if curr >= expected:
            packs.append(curr)
            curr = 0
    packs = np.array(packs)
    return dict(rows=len(packs), fill_of_max=packs.mean() / max_tokens, fill_of_expected=packs.mean() / expected)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=20000)
    p.add_argument("--buffer", type=int, default=64)
    a = p.parse_args(argv)
    costs = sample_costs(a.docs)
    share = costs[:, 0].sum() / (costs[:, 0].sum() + costs[:, 1].sum())
    print(f"mix: {a.docs} docs (T2I/VLM/edit, equal weights), und share of tokens {share:.3f}")
    for seq_len, max_images in ((32768, 12), (45056, 16)):
        und_len = int(round(seq_len * share / 256)) * 256
        t = time.perf_counter()
        r = ours(costs, seq_len, und_len, max_images, a.buffer)
        dt = time.perf_counter() - t
        print(f"ours      L={seq_len} (U={und_len}, G={seq_len - und_len}, N={max_images}, buffer={a.buffer}): "
              f"fill {100 * r['all']:.2f}% (und {100 * r['und']:.2f}%, gen {100 * r['gen']:.2f}%), "
              f"{r['rows']} rows, {r['dropped']} docs too large, {1e6 * dt / a.docs:.0f} us/doc")
    for expected, max_tokens in ((32768, 36864), (40960, 45056)):
        r = reference(costs, expected, max_tokens)
        print(f"reference expected={expected} max={max_tokens}: fill {100 * r['fill_of_max']:.2f}% of {max_tokens} "
              f"({100 * r['fill_of_expected']:.2f}% of {expected}), {r['rows']} rows")


if __name__ == "__main__":
    main()
