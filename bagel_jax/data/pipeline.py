"""Config → grain pipeline → host batches of ``PackedBatch`` rows.

    per kind (mixture weight > 0):  ArrayRecord source (TFDS) → record indices [host slice] → shuffle (seeded,
                                    reshuffled every epoch) → repeat → decode + transform (random_map: tokenise,
                                    resize, CFG dropout, timesteps) → Document | Skipped
    → weighted mix → pack (one budget per feature) → batches of rows → mp_prefetch (num_workers > 0)
    → TrainIterator: PackedBatch (numpy, batch dim = rows per host) + skip counters

A record that cannot become a document is skipped and counted by reason (``skips.SKIP_REASONS``); the counts and a
few messages per batch travel with the batches (so they also come from worker processes), and ``TrainIterator``
logs the messages rate-limited (``skips.SkipLog``), naming each record by its source (``file:line``).

Each host reads ``indices[process_index::process_count]`` of every source: hosts are disjoint and together cover
every epoch. Everything random is seeded by (config seed, kind, host, element index), so a pipeline is
reproducible and its iterator state (grain's ``get_state`` / ``set_state``, JSON, used by orbax's grain
checkpoint handler) resumes exactly.

Trainer API::

    it = make_train_iterator(config, process_index=jax.process_index(), process_count=jax.process_count())
    batch = next(it)                  # PackedBatch of numpy arrays [config.data.batch_size // process_count, ...]
    it.metrics()                      # {"data/skipped/<reason>": n, "data/fill": ..., ...}
    state = it.get_state(); it.set_state(state)
"""

from __future__ import annotations

import logging
from typing import Any

import ml_collections
import numpy as np

from bagel_jax.batch import FIELDS, PackedBatch
from bagel_jax.data import images as img_lib
from bagel_jax.data.builders import common
from bagel_jax.data.grain_import import grain
from bagel_jax.data.pack import Budgets, PackIterDataset, Skipped, split_extras, unlink_shared_memory
from bagel_jax.data.records import KINDS, SKIP_REASONS, RecordDecoder, RecordError
from bagel_jax.data.sample import LayoutConfig, build_document
from bagel_jax.data.skips import SkipLog, array_to_counts, counts_to_array
from bagel_jax.data.tokenizer import Tokenizer, load_tokenizer

KEY_BITS = 40  # record key = kind index << 40 | record index in its source


def record_key(kind: str, index: int) -> int:
    return (KINDS.index(kind) << KEY_BITS) | int(index)


def split_key(key: int) -> tuple[str, int]:
    return KINDS[key >> KEY_BITS], key & ((1 << KEY_BITS) - 1)


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def budgets_from_config(config: ml_collections.ConfigDict) -> Budgets:
    d, m = config.data, config.model
    return Budgets(
        seq_len=d.seq_len,
        und_len=d.und_len,
        max_vit_patches=d.max_vit_patches,
        max_vae_images=d.max_vae_images,
        vae_hw=tuple(d.vae_image_size),
        vit_patch_dim=3 * m.vit.patch_size**2,
        max_docs=d.max_docs_per_row,
        latent_stride=8 * m.latent_patch_size,
        pixel_dtype=d.pixel_dtype,
        max_labels=d.max_labels_per_row,
    )


def layout_from_config(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> LayoutConfig:
    d, m = config.data, config.model
    return LayoutConfig(
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
        vision_start_id=tokenizer.vision_start_id,
        vision_end_id=tokenizer.vision_end_id,
        vit_patch_size=m.vit.patch_size,
        vit_max_patches_per_side=m.vit_max_num_patch_per_side,
        vae_downsample=8 * m.latent_patch_size,
        max_latent_size=m.max_latent_size,
        vae_pad_hw=tuple(d.vae_image_size),
        interpolate_pos=m.interpolate_pos,
        text_cond_dropout_prob=d.text_cond_dropout_prob,
        vit_cond_dropout_prob=d.vit_cond_dropout_prob,
        vae_cond_dropout_prob=d.vae_cond_dropout_prob,
        ce_loss_reweighting=d.ce_loss_reweighting,
    )


def source_spec(config: ml_collections.ConfigDict, kind: str) -> str:
    spec = config.data.sources[kind] or (f"{config.data.builder}:{kind}" if config.data.builder else "")
    if not spec:
        raise ValueError(f"data.sources.{kind}: no source for mixture kind {kind!r} (set it or data.builder)")
    return spec


def tokenizer_from_config(config: ml_collections.ConfigDict) -> Tokenizer:
    """``data.tokenizer`` path, or the synthetic-shapes tokenizer in ``data_dir`` when that is the builder."""
    path = config.data.tokenizer
    if not path:
        from bagel_jax.data.builders import synthetic_shapes

        if config.data.builder != synthetic_shapes.NAME:
            raise ValueError("data.tokenizer: empty, and data.builder is not synthetic_shapes (which ships one)")
        path = synthetic_shapes.tokenizer_path(config.data.data_dir)
    tok = load_tokenizer(path)
    if tok.vocab_size > config.model.vocab_size:
        raise ValueError(
            f"data.tokenizer: {path} has {tok.vocab_size} ids > model.vocab_size {config.model.vocab_size}"
        )
    return tok


class DocumentTransform:
    """Record index → ``Document`` (or ``Skipped``): read, decode, tokenise, resize, lay out with CFG dropout.
    Never raises for a record: what the decoder does not classify is skipped as ``internal_error``."""

    def __init__(self, kind: str, source, decoder: RecordDecoder, layout: LayoutConfig):
        self.kind, self.source, self.decoder, self.layout = kind, source, decoder, layout

    def __call__(self, index: int, rng: np.random.Generator):
        key = record_key(self.kind, index)
        where = f"{self.kind} record #{index}"  # the record's own ``source`` (file:line) names it when it has one
        try:
            record = self.source[int(index)]
        except Exception as e:  # noqa: BLE001  (a corrupt record must not stop training)
            return Skipped("unreadable_record", f"{where}: unreadable ({type(e).__name__}: {e})")
        try:
            return build_document(self.decoder(record, rng, key, where), self.layout, rng)
        except (RecordError, img_lib.ImageError) as e:
            return Skipped(e.reason, str(e))
        except Exception as e:  # noqa: BLE001  (a decoder bug must not stop training either; it is counted)
            logging.debug("internal error decoding %s", where, exc_info=True)
            return Skipped("internal_error", f"{where}: {type(e).__name__}: {e} (a bug in the decoder, please report)")


def make_dataset(
    config: ml_collections.ConfigDict,
    process_index: int = 0,
    process_count: int = 1,
    *,
    num_epochs: int | None = None,
    num_workers: int | None = None,
    drop_remainder: bool = False,
) -> grain.IterDataset:
    """The grain dataset of batches (dicts: PackedBatch fields + extras ``skipped``, ``records``,
    ``real_tokens``, ``skip_messages``), ``config.data.batch_size // process_count`` rows each.

    ``num_epochs=None`` repeats forever; a finite value ends after that many passes over every source (mixing
    stops at the first exhausted source). ``num_workers`` defaults to ``config.data.num_workers``.
    """
    d = config.data
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if d.batch_size % process_count:
        raise ValueError(f"data.batch_size {d.batch_size} is not divisible by process_count {process_count}")
    tokenizer = tokenizer_from_config(config)
    layout = layout_from_config(config, tokenizer)
    vae_rule = img_lib.ResizeRule.from_tuple(d.vae_transform)
    kinds = [k for k in KINDS if d.mixture.get(k, 0.0) > 0]
    if not kinds:
        raise ValueError("data.mixture: all weights are 0")
    datasets, weights = [], []
    for kind in kinds:
        source = common.open_source(d.data_dir, source_spec(config, kind))
        ds = grain.MapDataset.range(len(source))[process_index::process_count]
        if len(ds) == 0:
            raise ValueError(f"data.sources.{kind}: {len(source)} records cannot feed {process_count} hosts")
        k = KINDS.index(kind)
        if d.shuffle:
            ds = ds.shuffle(seed=_seed(d.seed, k, 1))
        ds = ds.repeat(num_epochs)
        vit_rule = img_lib.ResizeRule.from_tuple(d.vit_transform_by_kind[kind] or d.vit_transform)
        decoder = RecordDecoder(kind, tokenizer, vae_rule, vit_rule, d.max_input_pixels, d.future_context_frames)
        ds = ds.random_map(DocumentTransform(kind, source, decoder, layout), seed=_seed(d.seed, k, 2, process_index))
        datasets.append(ds)
        weights.append(float(d.mixture[kind]))
    mixed = datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(datasets, weights)
    ds = PackIterDataset(
        mixed,
        budgets_from_config(config),
        d.batch_size // process_count,
        buffer_size=d.pack_buffer,
        drop_remainder=drop_remainder,
    )
    workers = d.num_workers if num_workers is None else num_workers
    if workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain reads its absl flags; outside an absl app use their defaults
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=d.prefetch))
    return ds


class TrainIterator(grain.DatasetIterator):
    """Host batches as ``PackedBatch`` (numpy); keeps running skip counts and fill for the training metrics, and
    logs the skip messages that come with the batches (rate-limited, ``skips.SkipLog``; from workers too).

    ``get_state`` / ``set_state`` wrap the grain pipeline state plus the counters (JSON-serialisable), so orbax's
    grain checkpoint handler (``grain.checkpoint.CheckpointSave``) can store it.
    ``last_extras`` holds the last batch's per-row ``records`` (record keys, -1 = none; see ``split_key``),
    ``real_tokens`` ([rows, 2]: und, gen) and ``skipped``.
    """

    def __init__(self, inner: grain.DatasetIterator, budgets: Budgets):
        super().__init__(inner)
        self.budgets = budgets
        self.skip_log = SkipLog("skipped a record")
        self.skipped = np.zeros(len(SKIP_REASONS), np.int64)
        self.rows = 0
        self.real_tokens = np.zeros(2, np.int64)
        self.last_extras: dict[str, np.ndarray] = {}

    def __next__(self) -> PackedBatch:
        while True:
            batch = next(self._parent)
            unlink_shared_memory(batch)
            fields, extras = split_extras(batch)
            skipped = extras["skipped"].sum(0)
            self.skipped += skipped
            if skipped.any():
                self._log_skips(skipped, extras.get("skip_messages", ()))
            real = extras["real_tokens"].astype(np.int64)
            if real.any():  # an all-padding batch only carries the last skip counts of a finite pipeline
                break
        self.rows += real.shape[0]
        self.real_tokens += real.sum(0)
        self.last_extras = extras
        return PackedBatch(**{k: np.asarray(v) for k, v in fields.items()})

    def _log_skips(self, skipped: np.ndarray, messages) -> None:
        """Logs (rate-limited) the sample messages of one batch; each stands for its share of the batch's count."""
        by_reason: dict[str, list[str]] = {}
        for m in messages:
            reason, _, text = str(m).partition("\t")
            by_reason.setdefault(reason, []).append(text)
        for reason, n in zip(SKIP_REASONS, skipped.tolist()):
            if n:
                texts = by_reason.get(reason) or ["(no message)"]
                for j, text in enumerate(texts[:n]):
                    self.skip_log(reason, text, 1 if j < min(len(texts), n) - 1 else n - j)

    def skip_counts(self) -> dict[str, int]:
        return array_to_counts(self.skipped)

    def metrics(self) -> dict[str, float]:
        """Cumulative: skipped records by reason, rows, real tokens; fill of the last batch (und, gen, all)."""
        out: dict[str, float] = {f"data/skipped/{r}": float(n) for r, n in self.skip_counts().items()}
        out["data/rows"] = float(self.rows)
        out["data/real_tokens"] = float(self.real_tokens.sum())
        if self.last_extras:
            real = self.last_extras["real_tokens"].astype(np.float64)
            b = self.budgets
            out["data/fill_und"] = float(real[:, 0].mean() / b.und_len)
            out["data/fill_gen"] = float(real[:, 1].mean() / b.gen_len) if b.gen_len else 0.0
            out["data/fill"] = float(real.sum(1).mean() / b.seq_len)
        return out

    def get_state(self) -> dict[str, Any]:
        return {
            "pipeline": self._parent.get_state(),
            "skipped": self.skip_counts(),
            "rows": int(self.rows),
            "real_tokens": self.real_tokens.tolist(),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["pipeline"])
        self.skipped = counts_to_array(state["skipped"])
        self.rows = int(state["rows"])
        self.real_tokens = np.asarray(state["real_tokens"], np.int64)
        self.last_extras = {}

    def __str__(self) -> str:
        return "TrainIterator"


class EmulatedHostsIterator:
    """One process reading as ``n`` hosts (``data.emulate_hosts``): host i's rows, concatenated in host order —
    the global batch an n-host run assembles with ``make_array_from_process_local_data`` — so a pod run's data
    stream is reproduced exactly on one machine (debugging, and the multi-process equivalence test)."""

    def __init__(self, iterators: list[TrainIterator]):
        self.iterators = iterators

    def __iter__(self):
        return self

    def __next__(self) -> PackedBatch:
        rows = [next(it) for it in self.iterators]
        return PackedBatch(**{f: np.concatenate([getattr(r, f) for r in rows]) for f in FIELDS})

    def metrics(self) -> dict[str, float]:
        """Counters summed over the emulated hosts; fills averaged."""
        per_host = [it.metrics() for it in self.iterators]
        reduce = {k: np.mean if k.startswith("data/fill") else np.sum for k in per_host[0]}
        return {k: float(reduce[k]([m.get(k, 0.0) for m in per_host])) for k in per_host[0]}

    def get_state(self) -> dict[str, Any]:
        return {"hosts": [it.get_state() for it in self.iterators]}

    def set_state(self, state: dict[str, Any]) -> None:
        for it, s in zip(self.iterators, state["hosts"], strict=True):
            it.set_state(s)


def make_train_iterator(
    config: ml_collections.ConfigDict, process_index: int = 0, process_count: int = 1, **kwargs
) -> TrainIterator | EmulatedHostsIterator:
    """``TrainIterator`` over ``make_dataset(config, process_index, process_count, **kwargs)``; with
    ``data.emulate_hosts = n > 1`` (single process only) an ``EmulatedHostsIterator`` over n host shards."""
    n = config.data.emulate_hosts
    if n > 1:
        if process_count != 1:
            raise ValueError(f"data.emulate_hosts={n} needs a single process, got {process_count}")
        return EmulatedHostsIterator([make_train_iterator_for_host(config, i, n, **kwargs) for i in range(n)])
    return make_train_iterator_for_host(config, process_index, process_count, **kwargs)


def make_train_iterator_for_host(
    config: ml_collections.ConfigDict, process_index: int, process_count: int, **kwargs
) -> TrainIterator:
    ds = make_dataset(config, process_index, process_count, **kwargs)
    return TrainIterator(iter(ds), budgets_from_config(config))
