"""Blocks visited by the split-wise attention kernel on realistic packed rows, vs the minimum and vs splash.

    python benchmarks/mask_blocks.py [--block 512] [--seed 0]

Builds rows of L = 32768 ("32K") and 46080 ("45K", 90 blocks of 512; the packing and AOT numbers use 45056) of
three mixes (T2I-heavy, VLM-heavy, interleaved) from the sample structures of the reference (its bagel.md §3.3,
§6.2), lays them out modality-sorted (und slots first, gen slots last, each region padded to its budget;
``index`` keeps the natural order), and prints a markdown table whose counts are summed over ``--rows`` rows:

* docs, und/gen tokens: documents packed and real tokens in the und and gen regions;
* kernel blocks: (q, kv) blocks the forward kernel computes (block map from per-block min/max, block_map.py);
* minimal: blocks that hold at least one allowed pair (exact, from the dense mask, chunked); kernel/min is
  their ratio (1.000 = the kernel skips every empty block);
* grid steps: the forward schedule's steps (kernel blocks plus one step per q block row without any block,
  which only writes zeros);
* FULL (min): blocks the kernel treats as fully allowed (no per-element mask), and the exact count of such blocks;
* splash causal+seg: blocks that splash attention with a static causal mask + segment ids would visit, COUNTED
  as n(n+1)/2 for n blocks per side (it cannot skip blocks by segment; and causal in physical order is not even
  the BAGEL mask), not measured by running splash; splash/kernel is that count ÷ kernel blocks;
* mask bytes/row ours: our metadata (4 × int32 per token) + the three schedules (fwd, dq, dkv: int32 per block
  pair); splash dynamic: splash's dynamic mask at one byte per (q, kv) pair, L² bytes. Both are computed sizes.
It also checks the block map against the dense mask and raises if it would skip a non-empty block.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bagel_jax.attention import block_map  # noqa: E402
from bagel_jax.attention.mask import CAUSAL, FULL, NOISE, MaskMeta, Split, metadata_from_splits  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Part:
    """One split of a sample: ``und`` tokens in und slots, ``gen`` tokens in gen slots (VAE latents)."""

    mode: str
    und: int  # text / ViT tokens and the two vision markers of a VAE image
    gen: int = 0


def _text(rng, lo, hi):
    return Part(CAUSAL, 2 + int(rng.integers(lo, hi)))  # <|im_start|> ids <|im_end|>


def _latents(rng, lo_side=512, hi_side=1024):
    """VAE image resized to sides in [512, 1024] (stride 16) → (H/16)·(W/16) latent tokens."""
    h, w = (int(rng.integers(lo_side // 16, hi_side // 16 + 1)) for _ in range(2))
    return h * w


def _vit(rng, max_side):
    """ViT image with sides in [224, max_side] (stride 14) → patches, plus the two markers."""
    h, w = (int(rng.integers(224 // 14, max_side // 14 + 1)) for _ in range(2))
    return Part(FULL, 2 + h * w)


def t2i(rng):
    """caption (no loss) + noised VAE image (reference T2I)."""
    return [_text(rng, 30, 80), Part(NOISE, 2, _latents(rng))]


def vlm(rng):
    """ViT image(s) up to 980² + 1–3 question/answer turns (reference VLM SFT)."""
    parts = [_vit(rng, 980) for _ in range(int(rng.integers(1, 3)))]
    for _ in range(int(rng.integers(1, 4))):
        parts += [_text(rng, 10, 80), _text(rng, 30, 400)]
    return parts


def edit(rng):
    """clean VAE + ViT of the source, instruction, noised target (reference unified edit)."""
    return [Part(FULL, 2, _latents(rng)), _vit(rng, 518), _text(rng, 10, 60), Part(NOISE, 2, _latents(rng))]


def interleaved(rng):
    """multi-step edit / interleaved: per step instruction + noised image, its clean VAE copy and ViT."""
    parts = [Part(FULL, 2, _latents(rng, 512, 768)), _vit(rng, 518)]
    for step in range(int(rng.integers(2, 4))):
        parts += [_text(rng, 10, 60), Part(NOISE, 2, _latents(rng, 512, 768))]
        if step < 2:
            parts += [Part(FULL, 2, _latents(rng, 512, 768)), _vit(rng, 518)]
    return parts


MIXES = {  # (sample kinds, weights, und share of the row)
    "T2I-heavy": ((t2i, vlm, edit), (0.7, 0.15, 0.15), 0.25),
    "VLM-heavy": ((vlm, t2i, edit), (0.75, 0.15, 0.10), 0.80),
    "interleaved": ((interleaved, edit, t2i, vlm), (0.4, 0.2, 0.2, 0.2), 0.45),
}


def pack_row(rng, mix: str, seq_len: int, block: int):
    """Packs samples of ``mix`` into one modality-sorted row; returns physical metadata (dict of int32[L])."""
    kinds, weights, und_share = MIXES[mix]
    und_len = int(round(seq_len * und_share / block)) * block
    gen_len = seq_len - und_len
    docs, und_used, gen_used, misses = [], 0, 0, 0
    while misses < 20:
        sample = kinds[rng.choice(len(kinds), p=weights)](rng)
        u, g = sum(p.und for p in sample), sum(p.gen for p in sample)
        if und_used + u <= und_len and gen_used + g <= gen_len:
            docs.append(sample)
            und_used, gen_used = und_used + u, gen_used + g
        else:
            misses += 1
    splits, is_gen = [], []
    for d, sample in enumerate(docs, start=1):
        for p in sample:
            splits.append(Split(d, p.mode, p.und + p.gen))
            if p.gen:  # <|vision_start|> latents <|vision_end|>
                is_gen += [False] + [True] * p.gen + [False] * (p.und - 1)
            else:
                is_gen += [False] * p.und
    natural = metadata_from_splits(splits)
    is_gen = np.asarray(is_gen)
    und_idx, gen_idx = np.nonzero(~is_gen)[0], np.nonzero(is_gen)[0]
    out = {}
    for f, x in natural.items():
        pad = lambda n, fill: np.full(n, fill, np.int32)  # noqa: E731
        fill = 0 if f == "doc" else x.shape[0]  # padding: doc 0 (index values do not matter)
        out[f] = np.concatenate(
            [x[und_idx], pad(und_len - len(und_idx), fill), x[gen_idx], pad(gen_len - len(gen_idx), fill)]
        ).astype(np.int32)
    return out, dict(docs=len(docs), und=und_used, gen=gen_used)


def count_row(meta: dict, block: int) -> dict:
    """Block counts of one row (forward kernel, bq = bkv = ``block``)."""
    m = MaskMeta(*(jnp.asarray(meta[f])[None] for f in ("doc", "index", "q_hi", "kv_hi")))
    kinds = np.asarray(block_map.block_kinds(m, m, block, block))[0]
    (fwd,) = block_map.schedules(m, m, block, block, by=("q",))
    exact = block_map.dense_block_kinds(meta, meta, block, block)
    if np.any((exact != block_map.EMPTY) & (kinds == block_map.EMPTY)) or np.any(
        (kinds == block_map.FULL) & (exact != block_map.FULL)
    ):
        raise AssertionError("block map is not sound")  # would be a kernel bug: fail loudly
    n = kinds.shape[0]
    length = len(meta["doc"])
    return dict(
        n=n,
        kernel=int((kinds != block_map.EMPTY).sum()),
        steps=int(fwd.count),
        minimal=int((exact != block_map.EMPTY).sum()),
        full=int((kinds == block_map.FULL).sum()),
        full_min=int((exact == block_map.FULL).sum()),
        splash=n * (n + 1) // 2,
        ours_bytes=4 * 4 * length + 3 * 4 * n * n,
        splash_bytes=length * length,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", type=int, default=2, help="rows per (mix, length); the table sums them")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    print(f"block_q = block_kv = {args.block}; {args.rows} rows per line, counts summed\n")
    print(
        "| row | L | docs | und/gen tokens | kernel blocks | minimal | kernel/min | grid steps | FULL (min) "
        "| splash causal+seg | splash/kernel | mask bytes/row ours | splash dynamic |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for length in (32768, 46080):
        for mix in MIXES:
            tot, info = {}, dict(docs=0, und=0, gen=0)
            for _ in range(args.rows):
                meta, inf = pack_row(rng, mix, length, args.block)
                for key, val in count_row(meta, args.block).items():
                    tot[key] = tot.get(key, 0) + val
                for key in info:
                    info[key] += inf[key]
            ratio = tot["kernel"] / tot["minimal"]
            worst = max(worst, ratio)
            r = args.rows
            print(
                f"| {mix} | {length // 1024}K | {info['docs']} | {info['und']}/{info['gen']} | {tot['kernel']} | "
                f"{tot['minimal']} | {ratio:.3f} | {tot['steps']} | {tot['full']} ({tot['full_min']}) | "
                f"{tot['splash']} | {tot['splash'] / tot['kernel']:.2f}× | "
                f"{tot['ours_bytes'] / r / 2**20:.2f} MiB | {tot['splash_bytes'] / r / 2**30:.2f} GiB |"
            )
    print(f"\nworst kernel/minimal ratio: {worst:.3f}")
    return worst


if __name__ == "__main__":
    jax.config.update("jax_platforms", "cpu")
    main()
