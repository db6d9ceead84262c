"""Packing fill: how full our rows are for a realistic BAGEL mix, next to a re-implementation of the official
``PackedDataset`` buffer loop on the same stream of documents and at the same row capacity.

Mix (equal sample weights, like the reference's example.yaml), token counts from the reference resize rules:
* T2I   image sides uniform in [512, 1024] px, VAE rule (1024, 512, 16) → (H/16)(W/16) gen tokens;
        caption 20–200 tokens (+2 text specials, +2 vision markers).
* VLM   image sides uniform in [224, 980] px, ViT rule (980, 378, 14, max_pixels 2_007_040) → patches (+2 markers);
        1–3 turns, question 10–80 tokens, answer 20–400 tokens (+2 specials per text).
* Edit  image sides uniform in [512, 1024] px: clean VAE (1024, 512, 16) + ViT (518, 224, 14) of the source,
        instruction 8–60 tokens, noised VAE target of the same size.

Packers, each given the same documents in the same order and rows of the same capacity L (32768 and 45056):
* ``bagel_jax``: our ``RowPacker`` (buffer of ``--buffer`` documents; each row starts with the oldest and is
  filled greedily with one-step lookahead) filling und slots [0, U) and gen slots [U, L), at most N VAE images
  per row. U is the mix's mean und share of L, rounded to 256 (a TPU-friendly multiple), so neither region starves.
* ``PackedDataset loop (re-impl.)``: ``packed_dataset_loop`` below, a re-implementation of the official
  ``PackedDataset.__iter__`` buffer loop (data/dataset_base.py; ~27 lines, no mandatory groups), NOT the official
  code. Its rows hold any mix of tokens up to ``max_num_tokens`` = L (also the length the official code pads to
  for flex attention) and are closed once they reach ``expected_num_tokens`` = L − gap, for each of ``--gaps``
  (the official defaults 32768 / 36864 have a gap of 4096; a smaller gap fills rows fuller and drops more
  documents); buffer 50, prefer_buffer_before 16384, max 16384 tokens per sample. Unlike ours, the loop has no
  und/gen regions and no cap on VAE images per row.
* ``PackedDataset loop (re-impl.), official sizes``: the same loop with the official defaults (expected 32768,
  max 36864): rows of 36864, a *larger* capacity than our 32768; printed for reference, not for comparison.

Columns: ``rows``: rows filled from the stream; ``real tokens / row``: non-padding tokens per row, the mean;
``tokens / padded row slot``: real tokens ÷ (rows × row capacity), i.e. the fill; ``docs dropped``: documents
never placed (ours: too large for an empty row; the loop: a sample that does not fit when its buffer is full,
or larger than 16384 tokens). At equal capacity the middle two columns rank packers alike; they differ for the
official-sizes row, whose rows are larger. Prints a markdown table.

    python benchmarks/pack_fill.py [--docs 20000] [--buffer 64] [--gaps 4096,2048,1024] [--max_labels 4096,5632]
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
    """int64[n, 6]: und tokens, gen tokens, ViT patches, VAE images, 1 (documents), CE labels (VLM answers + their
    end token) for the mix above."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, 6), np.int64)
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
            qa = [(int(rng.integers(10, 81)), int(rng.integers(20, 401))) for _ in range(turns)]  # question, answer
            text = sum(q + 2 + a + 2 for q, a in qa)
            out[i, :4] = (patches + 2 + text, 0, patches, 0)
            out[i, 5] = sum(a + 1 for _, a in qa)
        else:  # edit
            w, h = rng.integers(512, 1025, size=2)
            vae, vit = _tokens(VAE, w, h), _tokens(VIT_EDIT, w, h)
            out[i, :4] = (2 + vit + 2 + int(rng.integers(8, 61)) + 2 + 2, 2 * vae, vit, 2)
    return out


def ours(costs: np.ndarray, seq_len: int, und_len: int, max_vae_images: int, buffer: int, max_labels: int = 0) -> dict:
    """Our ``RowPacker`` on ``costs``: rows of ``seq_len`` slots, und region [0, und_len), gen region after it,
    at most ``max_labels`` CE labels per row (0: und_len, i.e. no limit)."""
    cap = np.array([und_len, seq_len - und_len, und_len, max_vae_images, 512, max_labels or und_len], np.int64)
    packer = RowPacker(cap, buffer)
    rows, dropped = [], 0
    for i, c in enumerate(costs):
        if not packer.fits_empty(c):
            dropped += 1
            continue
        rows.extend(packer.add(i, c))
    used = np.array([costs[r].sum(0) for r in rows])
    real = used[:, 0] + used[:, 1]
    return dict(
        rows=len(rows),
        dropped=dropped,
        capacity=seq_len,
        real_per_row=real.mean(),
        fill=real.sum() / (len(rows) * seq_len),
        und=used[:, 0].sum() / (len(rows) * und_len),
        gen=used[:, 1].sum() / (len(rows) * (seq_len - und_len)),
    )


def packed_dataset_loop(
    costs: np.ndarray,
    expected: int,
    max_tokens: int,
    per_sample: int = 16384,
    prefer_buffer_before: int = 16384,
    max_buffer: int = 50,
) -> dict:
    """A re-implementation of the official ``PackedDataset.__iter__`` buffer loop (not the official code; no
    mandatory groups; each sample's 2 tokens per plan item are in the costs already): rows of up to
    ``max_tokens`` tokens, closed once they hold ``expected`` or more."""
    totals = costs[:, 0] + costs[:, 1]
    packs, buffer, curr, i, dropped = [], [], 0, 0, 0
    while i < len(totals):
        if curr < prefer_buffer_before and buffer:
            n, from_buffer = buffer.pop(0), True
        else:
            n, from_buffer = int(totals[i]), False
            i += 1
        if n > per_sample:
            dropped += 1
            continue
        if curr + n > max_tokens:
            if len(buffer) < max_buffer and not from_buffer:
                buffer.append(n)
            else:  # the official loop yields the pack and drops this sample
                packs.append(curr)
                curr = 0
                dropped += 1
            continue
        curr += n
        if curr >= expected:
            packs.append(curr)
            curr = 0
    packs = np.array(packs)
    return dict(
        rows=len(packs), dropped=dropped, capacity=max_tokens, real_per_row=packs.mean(), fill=packs.mean() / max_tokens
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=20000)
    p.add_argument("--buffer", type=int, default=64, help="our packer's buffer (documents)")
    p.add_argument(
        "--gaps",
        default="4096,2048,1024",
        help="the loop's max_num_tokens - expected_num_tokens, comma-separated (official: 4096)",
    )
    p.add_argument(
        "--max_labels",
        default="0,0",
        help="CE labels per row (data.max_labels_per_row) at 32K and 45K, comma-separated (0 = no limit)",
    )
    a = p.parse_args(argv)
    labels = dict(zip((32768, 45056), (int(x) for x in a.max_labels.split(","))))
    costs = sample_costs(a.docs)
    share = costs[:, 0].sum() / (costs[:, 0].sum() + costs[:, 1].sum())
    print(f"mix: {a.docs} docs (T2I/VLM/edit, equal weights), und share of tokens {share:.3f}\n")
    print("| row capacity | packer | rows | real tokens / row | tokens / padded row slot | docs dropped |")
    print("|---|---|---|---|---|---|")
    results = []
    for seq_len, max_images in ((32768, 12), (45056, 16)):
        und_len = int(round(seq_len * share / 256)) * 256
        t = time.perf_counter()
        r = ours(costs, seq_len, und_len, max_images, a.buffer, labels[seq_len])
        dt = time.perf_counter() - t
        name = (
            f"bagel_jax (U={und_len}, G={seq_len - und_len}, N={max_images}, K={labels[seq_len] or 'U'}, "
            f"buffer={a.buffer}; "
            f"und {100 * r['und']:.2f}%, gen {100 * r['gen']:.2f}%; {1e6 * dt / a.docs:.0f} us/doc)"
        )
        results.append((name, r))
        for gap in (int(g) for g in a.gaps.split(",")):
            results.append(
                (
                    f"PackedDataset loop (re-impl.), expected {seq_len - gap}, max {seq_len}",
                    packed_dataset_loop(costs, seq_len - gap, seq_len),
                )
            )
    results.append(
        (
            "PackedDataset loop (re-impl.), official sizes: expected 32768, max 36864 (larger rows)",
            packed_dataset_loop(costs, 32768, 36864),
        )
    )
    for name, r in results:
        print(
            f"| {r['capacity']} | {name} | {r['rows']} | {r['real_per_row']:.0f} | {100 * r['fill']:.2f}% | "
            f"{r['dropped']} |"
        )
    return results


if __name__ == "__main__":
    main()
