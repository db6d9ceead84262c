"""Packing documents into fixed-budget rows (DESIGN §4) and writing rows as ``PackedBatch`` arrays.

* ``Budgets``: one budget per feature — und tokens (text + ViT), gen tokens (VAE latents), ViT patches,
  VAE images — plus a cap on documents per row (so per-row record ids have a static shape).
* ``RowPacker``: buffered multi-budget packing: documents wait in a buffer; a row starts with the oldest one and
  is filled greedily (largest und + gen tokens with one-step lookahead) until nothing else fits. A document that
  cannot fit an empty row is rejected (counted ``too_large`` by the caller), never truncated.
* ``write_row``: one row in the modality-sorted layout: und slots [0, U) hold each document's text/ViT tokens,
  gen slots [U, L) its VAE latent tokens, documents one after another in both regions. Mask metadata comes from
  ``metadata_from_splits`` in natural order (documents one after another, then und padding, then gen padding)
  and is permuted into the slots, so ``index`` increases within each region.
* ``PackIterDataset``: a grain ``IterDataset`` reading a ``MapDataset`` of ``Document`` (or ``Skipped``) by index,
  packing and emitting batches of rows. Its state (next index, the indices in the buffer and in finished-but-unemitted
  rows, skip counts not yet reported) restores exactly: documents are re-read by index (transforms are
  deterministic per index). Supports grain's worker slicing and shared-memory output. Every batch carries the
  skip counts since the previous one (``skipped``, per reason, in row 0) and a few of their messages
  (``skip_messages``: ``"reason\tmessage"`` strings, at most ``MESSAGES_PER_REASON`` per reason and batch), so
  both reach the trainer's process from grain workers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from bagel_jax.batch import FIELDS
from bagel_jax.data import images as img_lib
from bagel_jax.data.grain_import import grain
from bagel_jax.data.records import SKIP_REASONS
from bagel_jax.data.sample import Document
from bagel_jax.data.skips import array_to_counts, counts_to_array
from bagel_jax.splits import Split, metadata_from_splits

EXTRA_FIELDS = ("skipped", "records", "real_tokens", "skip_messages")  # extras next to the PackedBatch fields
MESSAGES_PER_REASON = 2  # skip messages sent with one batch, per reason (the counts are always complete)
MAX_SKIPS_IN_A_ROW = 10_000  # this many skipped records without one usable document: the data is unusable


@dataclasses.dataclass(frozen=True)
class Budgets:
    """Static row budgets. ``vae_hw`` = the VAE image pad size (H, W); ``latent_stride`` pixels per latent token."""

    seq_len: int
    und_len: int
    max_vit_patches: int
    max_vae_images: int
    vae_hw: tuple[int, int]
    vit_patch_dim: int
    max_docs: int = 256
    latent_stride: int = 16
    pixel_dtype: str = "float32"  # "float32": pixels in [-1, 1] (the PackedBatch contract); "uint8": raw [0, 255]
    max_labels: int = 0  # CE label slots per row (0 = no limit beyond und_len): the model's static label buffer

    def __post_init__(self):
        if self.pixel_dtype not in ("float32", "uint8"):
            raise ValueError(f"pixel_dtype must be 'float32' or 'uint8', got {self.pixel_dtype!r}")

    @property
    def gen_len(self) -> int:
        return self.seq_len - self.und_len

    @property
    def latent_tokens_per_image(self) -> int:
        return (self.vae_hw[0] // self.latent_stride) * (self.vae_hw[1] // self.latent_stride)

    @property
    def capacity(self) -> np.ndarray:
        labels = self.max_labels or self.und_len
        return np.array(
            [self.und_len, self.gen_len, self.max_vit_patches, self.max_vae_images, self.max_docs, labels], np.int64
        )


def doc_cost(doc: Document) -> np.ndarray:
    """int64[6]: und tokens, gen tokens, ViT patches, VAE images, 1 document, CE label slots (``und_ce > 0``)."""
    return np.array(doc.cost + (1, int(np.count_nonzero(np.asarray(doc.und_ce) > 0))), np.int64)


class RowPacker:
    """Buffered multi-budget packing of items (opaque ids) with costs into rows (see module doc).

    Items wait in a buffer of ``buffer_size``. Each time the buffer is full, one row is built: it starts with the
    oldest item (so nothing waits longer than ``buffer_size`` rows), then repeatedly takes the fitting item that
    maximises its own und + gen tokens plus those of the best item that would still fit after it (one-step
    lookahead), until nothing fits.
    """

    def __init__(self, capacity: np.ndarray, buffer_size: int = 64):
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        self.capacity = np.asarray(capacity, np.int64)
        self.buffer_size = buffer_size
        self.items: list = []
        self.costs = np.zeros((0, len(self.capacity)), np.int64)

    def fits_empty(self, cost: np.ndarray) -> bool:
        return bool(np.all(np.asarray(cost) <= self.capacity))

    def add(self, item, cost: np.ndarray) -> list[list]:
        """Buffers ``item``; returns the rows (lists of items) completed by it. Rejects items larger than a row."""
        cost = np.asarray(cost, np.int64)
        if not self.fits_empty(cost):
            raise ValueError(f"item {item} with cost {cost.tolist()} exceeds an empty row {self.capacity.tolist()}")
        self.items.append(item)
        self.costs = np.concatenate([self.costs, cost[None]])
        rows = []
        while len(self.items) >= self.buffer_size:
            rows.append(self._build_row())
        return rows

    def flush(self) -> list[list]:
        """Packs everything still buffered."""
        rows = []
        while self.items:
            rows.append(self._build_row())
        return rows

    def _take(self, j: int):
        item = self.items.pop(j)
        cost = self.costs[j]
        self.costs = np.delete(self.costs, j, axis=0)
        return item, cost

    def _build_row(self) -> list:
        item, used = self._take(0)
        row = [item]
        cap = self.capacity
        while self.items:
            c = self.costs
            fit = np.nonzero(np.all(used + c <= cap, axis=1))[0]
            if len(fit) == 0:
                break
            cf = c[fit]
            tokens = cf[:, 0] + cf[:, 1]
            ok2 = np.all((used + cf)[:, None, :] + cf[None, :, :] <= cap, axis=2)
            np.fill_diagonal(ok2, False)
            second = np.where(ok2, tokens[None, :], 0).max(axis=1)
            item, cost = self._take(int(fit[np.argmax(tokens + second)]))
            row.append(item)
            used = used + cost
        return row


# --- row assembly ----------------------------------------------------------------------------------------------


def field_shapes(b: Budgets, rows: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every output field for ``rows`` rows (PackedBatch fields + extras)."""
    L, U, G, P, N = b.seq_len, b.und_len, b.gen_len, b.max_vit_patches, b.max_vae_images
    H, W = b.vae_hw
    i32, f32, px = np.int32, np.float32, np.dtype(b.pixel_dtype)
    return {
        "kind": ((rows, L), i32),
        "position": ((rows, L), i32),
        "index": ((rows, L), i32),
        "doc": ((rows, L), i32),
        "q_hi": ((rows, L), i32),
        "kv_hi": ((rows, L), i32),
        "text_ids": ((rows, U), i32),
        "labels": ((rows, U), i32),
        "ce_weight": ((rows, U), f32),
        "vit_patches": ((rows, P, b.vit_patch_dim), px),
        "vit_pos": ((rows, P), i32),
        "vit_image": ((rows, P), i32),
        "vit_slot": ((rows, P), i32),
        "vae_images": ((rows, N, H, W, 3), px),
        "vae_hw": ((rows, N, 2), i32),
        "vae_timestep": ((rows, N), f32),
        "vae_src": ((rows, G), i32),
        "vae_pos": ((rows, G), i32),
        "skipped": ((rows, len(SKIP_REASONS)), np.int64),
        "records": ((rows, b.max_docs), np.int64),
        "real_tokens": ((rows, 2), i32),
    }


def allocate(b: Budgets, rows: int, alloc=np.zeros) -> dict[str, np.ndarray]:
    """Zeroed arrays (``alloc(shape, dtype)``) for ``rows`` rows, with the padding defaults of ``batch.empty_row``."""
    out = {k: alloc(shape, dtype) for k, (shape, dtype) in field_shapes(b, rows).items()}
    for r in range(rows):
        clear_row(out, r, b)
    return out


def clear_row(out: dict[str, np.ndarray], r: int, b: Budgets) -> None:
    """Sets row ``r`` to all padding (only the fields whose padding value is non-zero need writing)."""
    idx = np.arange(b.seq_len, dtype=np.int32)
    out["index"][r] = idx
    out["q_hi"][r] = idx
    out["kv_hi"][r] = np.iinfo(np.int32).max
    out["vit_slot"][r] = b.und_len
    out["vae_timestep"][r] = -np.inf
    out["records"][r] = -1


def _pixels(src: np.ndarray, dst: np.ndarray) -> None:
    """uint8 pixels into the row: normalised to [-1, 1] for float32 outputs, copied for uint8 outputs."""
    if dst.dtype == np.uint8:
        dst[...] = src
    else:
        img_lib.normalize(src, out=dst)


def write_row(out: dict[str, np.ndarray], r: int, docs: Sequence[Document], b: Budgets) -> None:
    """Writes ``docs`` into row ``r`` of the zeroed/padded arrays ``out`` (see module doc for the layout)."""
    U, G, L, T = b.und_len, b.gen_len, b.seq_len, b.latent_tokens_per_image
    nat_u = np.empty(U, np.int32)
    nat_g = np.empty(G, np.int32)
    splits: list[Split] = []
    nat0 = u0 = g0 = v0 = i0 = vimg0 = 0
    for d, doc in enumerate(docs, start=1):
        nu, ng, nv, ni = doc.cost
        us, gs = slice(u0, u0 + nu), slice(U + g0, U + g0 + ng)
        out["kind"][r, us] = doc.und_kind
        out["position"][r, us] = doc.und_pos
        out["text_ids"][r, us] = doc.und_text
        out["labels"][r, us] = doc.und_label
        out["ce_weight"][r, us] = doc.und_ce
        nat_u[us] = nat0 + doc.und_nat
        out["kind"][r, gs] = doc.gen_kind
        out["position"][r, gs] = doc.gen_pos
        nat_g[g0 : g0 + ng] = nat0 + doc.gen_nat
        out["vae_src"][r, g0 : g0 + ng] = i0 * T + doc.gen_src
        out["vae_pos"][r, g0 : g0 + ng] = doc.gen_latent_pos
        if nv:
            _pixels(doc.vit_patches, out["vit_patches"][r, v0 : v0 + nv])
            out["vit_pos"][r, v0 : v0 + nv] = doc.vit_pos
            out["vit_image"][r, v0 : v0 + nv] = vimg0 + doc.vit_img + 1
            out["vit_slot"][r, v0 : v0 + nv] = u0 + doc.vit_und
        for k, px in enumerate(doc.vae_pixels):
            h, w = px.shape[:2]
            _pixels(px, out["vae_images"][r, i0 + k, :h, :w])
            out["vae_hw"][r, i0 + k] = (h, w)
        out["vae_timestep"][r, i0 : i0 + ni] = doc.vae_timestep
        out["records"][r, d - 1] = doc.key
        splits.extend(Split(d, m, int(n)) for m, n in zip(doc.split_modes, doc.split_lens))
        nat0 += doc.num_tokens
        u0, g0, v0, i0, vimg0 = u0 + nu, g0 + ng, v0 + nv, i0 + ni, vimg0 + doc.num_vit_images
    meta = metadata_from_splits(splits, L)
    nat_u[u0:] = nat0 + np.arange(U - u0, dtype=np.int32)
    nat_g[g0:] = nat0 + (U - u0) + np.arange(G - g0, dtype=np.int32)
    nat = np.concatenate([nat_u, nat_g])
    out["index"][r] = nat
    for k in ("doc", "q_hi", "kv_hi"):
        out[k][r] = meta[k][nat]
    out["real_tokens"][r] = (u0, g0)


def assemble(
    rows: Sequence[Sequence[Document]], b: Budgets, num_rows: int | None = None, alloc=np.zeros
) -> dict[str, np.ndarray]:
    """Arrays for ``num_rows`` rows (default ``len(rows)``); rows beyond ``rows`` are padding."""
    num_rows = len(rows) if num_rows is None else num_rows
    out = allocate(b, num_rows, alloc)
    for r, docs in enumerate(rows):
        write_row(out, r, docs, b)
    return out


def unlink_shared_memory(batch: dict) -> None:
    """Removes the names of the shared-memory blocks that hold ``batch`` (arrays grain opened from a worker's
    output) as soon as the batch arrives. The arrays stay valid (the mapping lives until they are freed), and nothing
    is left to leak when they outlive the process's cleanup: still referenced at exit (a device buffer aliasing host
    memory) or released by grain's deferred-deletion thread after it stopped."""
    for value in batch.values():
        shm = getattr(value, "shm", None)
        if shm is not None and getattr(value, "_unlink_on_del", False):
            try:
                shm.unlink()
            except FileNotFoundError:
                pass
            value._unlink_on_del = False


def split_extras(batch: dict) -> tuple[dict, dict]:
    """(PackedBatch fields, extras) of an assembled batch dict."""
    return {k: batch[k] for k in FIELDS}, {k: batch[k] for k in EXTRA_FIELDS if k in batch}


# --- grain dataset ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A record the transform rejected; the packer counts it by ``reason`` (one of ``skips.SKIP_REASONS``)."""

    reason: str
    message: str = ""


class PackIterDataset(grain.IterDataset):
    """Packs a ``MapDataset`` of ``Document | Skipped`` into batches of ``batch_rows`` rows (dicts of arrays).

    Finite parents end with a last batch padded with empty rows unless ``drop_remainder``; skip counts not yet
    reported then come in one final all-padding batch (``TrainIterator`` absorbs it).
    """

    def __init__(
        self,
        parent: grain.MapDataset,
        budgets: Budgets,
        batch_rows: int,
        buffer_size: int = 64,
        drop_remainder: bool = False,
    ):
        super().__init__(parent)
        self.budgets, self.batch_rows, self.buffer_size = budgets, batch_rows, buffer_size
        self.drop_remainder = drop_remainder
        self.shared_memory = False

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        """grain worker slicing (``mp_prefetch``): this worker packs elements ``sl`` of the parent."""
        del sequential_slice
        self._parents = (self._parent.slice(sl),)

    def enable_shared_memory_output(self) -> None:
        """Called by grain in worker processes: allocate batches in shared memory (no copy to the consumer)."""
        self.shared_memory = True

    def __iter__(self) -> PackDatasetIterator:
        return PackDatasetIterator(self)

    def __str__(self) -> str:
        return f"PackIterDataset(batch_rows={self.batch_rows}, buffer_size={self.buffer_size})"


_BUDGET_NAMES = (
    ("und tokens", "data.und_len"),
    ("gen tokens", "data.gen_len"),
    ("ViT patches", "data.max_vit_patches"),
    ("VAE images", "data.max_vae_images"),
    ("documents", "data.max_docs_per_row"),
    ("CE labels", "data.max_labels_per_row"),
)


class PackDatasetIterator(grain.DatasetIterator):
    """Iterator of ``PackIterDataset``; state = next index, buffered and ready indices, unreported skips."""

    def __init__(self, ds: PackIterDataset):
        super().__init__()
        self._ds = ds
        self._source: grain.MapDataset = ds._parent
        self._length = len(self._source)
        self._reset()

    def _reset(self):
        self._next = 0
        self._packer = RowPacker(self._ds.budgets.capacity, self._ds.buffer_size)
        self._ready: list[list[int]] = []
        self._docs: dict[int, Document] = {}
        self._skipped = np.zeros(len(SKIP_REASONS), np.int64)
        self._messages: list[str] = []
        self._in_a_row = 0
        self._exhausted = False

    def _skip(self, reason: str, message: str) -> None:
        i = SKIP_REASONS.index(reason)
        if self._skipped[i] < MESSAGES_PER_REASON:
            self._messages.append(f"{reason}\t{message}")
        self._skipped[i] += 1
        self._in_a_row += 1
        if self._in_a_row >= MAX_SKIPS_IN_A_ROW:
            counts = ", ".join(f"{r} {n}" for r, n in zip(SKIP_REASONS, self._skipped) if n)
            raise ValueError(f"data: {self._in_a_row} records in a row were skipped ({counts}); the last: {message}")

    def _read(self, index: int):
        el = self._source[index]
        if el is None:
            return Skipped("bad_record", "filtered")
        return el

    def _consume_one(self) -> None:
        index = self._next
        self._next += 1
        el = self._read(index)
        if isinstance(el, Skipped):
            self._skip(el.reason, el.message)
            return
        cost = doc_cost(el)
        if not self._packer.fits_empty(cost):
            over = ", ".join(
                f"{c} {what} > {key} {m}"
                for (what, key), c, m in zip(_BUDGET_NAMES, cost, self._packer.capacity)
                if c > m
            )
            self._skip("too_large", f"{el.source or f'record {el.key}'}: does not fit an empty row ({over})")
            return
        self._in_a_row = 0
        self._docs[index] = el
        self._ready.extend(self._packer.add(index, cost))

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        rows = self._ds.batch_rows
        while len(self._ready) < rows and not self._exhausted:
            if self._next >= self._length:
                self._exhausted = True
                self._ready.extend(self._packer.flush())
                break
            self._consume_one()
        if not self._ready or (self._exhausted and self._ds.drop_remainder and len(self._ready) < rows):
            if not self._skipped.any():
                raise StopIteration
            self._ready = []  # end of data: one all-padding batch reports the last skip counts
        take, self._ready = self._ready[:rows], self._ready[rows:]
        docs = [[self._docs.pop(i) for i in row] for row in take]
        if self._ds.shared_memory:
            from grain._src.python.ipc.shared_memory_array import SharedMemoryArray

            alloc = lambda shape, dtype: SharedMemoryArray(shape, dtype)  # noqa: E731  (new shm is zero-filled)
        else:
            alloc = np.zeros
        out = assemble(docs, self._ds.budgets, rows, alloc)
        out["skipped"][0] = self._skipped
        out["skip_messages"] = np.asarray(self._messages, dtype=np.str_).reshape(-1)
        self._skipped = np.zeros_like(self._skipped)
        self._messages = []
        return out

    def get_state(self) -> dict:
        return {
            "next": int(self._next),
            "buffer": [int(i) for i in self._packer.items],
            "ready": [list(map(int, r)) for r in self._ready],
            "skipped": array_to_counts(self._skipped),
            "exhausted": bool(self._exhausted),
        }

    def set_state(self, state: dict) -> None:
        self._reset()
        self._next = int(state["next"])
        self._exhausted = bool(state["exhausted"])
        self._skipped = counts_to_array(state["skipped"])
        for i in state["buffer"]:
            self._docs[i] = self._read(i)
            self._packer.items.append(i)
        self._packer.costs = np.array([doc_cost(self._docs[i]) for i in self._packer.items], np.int64).reshape(
            -1, len(self._packer.capacity)
        )
        for row in state["ready"]:
            for i in row:
                self._docs[i] = self._read(i)
            self._ready.append(list(row))

    def __str__(self) -> str:
        return f"PackDatasetIterator(next={self._next})"
