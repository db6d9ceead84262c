"""PackedBatch: the one structure that crosses from the data pipeline into the model (DESIGN §4).

Plain arrays only (numpy on the host, jax.Array on device); no grain/TFDS types. Every field has a
leading batch dim B (rows). One row = one fixed token budget ``L = U + G``:

* slots ``[0, U)``  hold understanding tokens (text incl. special tokens, ViT patches) → und expert;
* slots ``[U, L)`` hold generation tokens (VAE latent patches, clean or noised) → gen expert.

Physical order is modality-sorted; the natural order of the row is carried by ``index`` (mask) and
``position`` (RoPE). Budgets (static): L seq_len, U und_len, G gen_len, P max_vit_patches,
N max_vae_images, (H, W) VAE image pad size (multiples of 16), T = (H/16)·(W/16) latent tokens/image.

| field          | shape / dtype     | meaning |
|----------------|-------------------|---------|
| kind           | int32[B, L]       | KIND_* below |
| position       | int32[B, L]       | RoPE position id (restarts per document; one id per image) |
| index          | int32[B, L]       | logical index (natural order); increasing within each region |
| doc            | int32[B, L]       | document id in the row, 0 = padding |
| q_hi, kv_hi    | int32[B, L]       | mask metadata (attention/mask.py) |
| text_ids       | int32[B, U]       | token id at text slots (0 elsewhere) |
| labels         | int32[B, U]       | next-token target predicted *at* this slot (0 where no loss) |
| ce_weight      | float32[B, U]     | CE weight at this slot (0 = no loss) |
| vit_patches    | float32[B, P, p·p·3] | packed ViT patches in [-1, 1], feature order (ph, pw, c) |
| vit_pos        | int32[B, P]       | ViT position id row·S + col (S = vit_max_num_patch_per_side) |
| vit_image      | int32[B, P]       | image id within the row (1-based; 0 = padding) — NaViT attention groups |
| vit_slot       | int32[B, P]       | destination und slot of each patch (U for padding: dropped by the scatter) |
| vae_images     | float32[B, N, H, W, 3] | images for the VAE in [-1, 1], zero-padded bottom/right |
| vae_hw         | int32[B, N, 2]    | valid pixel (h, w) of each image (multiples of 16; 0 = no image) |
| vae_timestep   | float32[B, N]     | raw logit z of the flow time (t = shift(sigmoid(z))); -inf for clean/no image |
| vae_src        | int32[B, G]       | a gen slot's source n·T + r·(W/16) + c in the row's [N, T] latent tokens |
| vae_pos        | int32[B, G]       | latent position id r·max_latent_size + c of each gen slot |

Gen slot g holds a noised latent iff ``kind[U + g] == KIND_NOISED_VAE``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

KIND_PAD, KIND_TEXT, KIND_VIT, KIND_CLEAN_VAE, KIND_NOISED_VAE = 0, 1, 2, 3, 4

FIELDS = (
    "kind",
    "position",
    "index",
    "doc",
    "q_hi",
    "kv_hi",
    "text_ids",
    "labels",
    "ce_weight",
    "vit_patches",
    "vit_pos",
    "vit_image",
    "vit_slot",
    "vae_images",
    "vae_hw",
    "vae_timestep",
    "vae_src",
    "vae_pos",
)


class PackedBatch(NamedTuple):
    """The fields of the table above. A NamedTuple, so jax treats it as a pytree (jit, ``tree.map``, shardings
    given as a ``PackedBatch`` of specs) while this module imports only numpy: the data pipeline stays jax-free."""

    kind: Any
    position: Any
    index: Any
    doc: Any
    q_hi: Any
    kv_hi: Any
    text_ids: Any
    labels: Any
    ce_weight: Any
    vit_patches: Any
    vit_pos: Any
    vit_image: Any
    vit_slot: Any
    vae_images: Any
    vae_hw: Any
    vae_timestep: Any
    vae_src: Any
    vae_pos: Any

    @property
    def und_len(self) -> int:
        return self.text_ids.shape[-1]

    @property
    def seq_len(self) -> int:
        return self.kind.shape[-1]

    @property
    def gen_len(self) -> int:
        return self.seq_len - self.und_len

    def replace(self, **fields) -> PackedBatch:
        return self._replace(**fields)

    def to_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in FIELDS}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PackedBatch:
        missing = [f for f in FIELDS if f not in d]
        if missing:
            raise KeyError(f"PackedBatch is missing fields {missing}")
        return cls(**{f: d[f] for f in FIELDS})


def empty_row(
    seq_len: int, und_len: int, max_vit_patches: int, vit_patch_dim: int, max_vae_images: int, vae_hw: tuple[int, int]
) -> dict[str, np.ndarray]:
    """All-padding numpy row (no batch dim) with the given budgets; the packer fills it."""
    gen_len = seq_len - und_len
    h, w = vae_hw
    idx = np.arange(seq_len, dtype=np.int32)
    return dict(
        kind=np.zeros(seq_len, np.int32),
        position=np.zeros(seq_len, np.int32),
        index=idx.copy(),
        doc=np.zeros(seq_len, np.int32),
        q_hi=idx.copy(),
        kv_hi=np.full(seq_len, np.iinfo(np.int32).max, np.int32),
        text_ids=np.zeros(und_len, np.int32),
        labels=np.zeros(und_len, np.int32),
        ce_weight=np.zeros(und_len, np.float32),
        vit_patches=np.zeros((max_vit_patches, vit_patch_dim), np.float32),
        vit_pos=np.zeros(max_vit_patches, np.int32),
        vit_image=np.zeros(max_vit_patches, np.int32),
        vit_slot=np.full(max_vit_patches, und_len, np.int32),
        vae_images=np.zeros((max_vae_images, h, w, 3), np.float32),
        vae_hw=np.zeros((max_vae_images, 2), np.int32),
        vae_timestep=np.full(max_vae_images, -np.inf, np.float32),
        vae_src=np.zeros(gen_len, np.int32),
        vae_pos=np.zeros(gen_len, np.int32),
    )
