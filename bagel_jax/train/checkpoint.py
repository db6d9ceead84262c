"""Orbax checkpoints: the sharded ``TrainState`` + each host's data-iterator state, async, keep-N, resume.

Layout: ``<workdir>/checkpoints/<step>/{state, data}``. ``state`` is the whole ``TrainState`` (params,
optimizer, EMA, step, rng, nonfinite count) written shard-by-shard from every host (no gather); ``data``
holds one JSON file per host (``process_<i>-of-<n>.json``, written by grain's orbax handler) with that host's
iterator ``get_state()``, snapshotted when ``save`` is called. Orbax writes into a temporary directory and renames
it on commit, so a process killed mid-save leaves the previous checkpoint intact.

Restores take abstract arrays that carry the *current* shardings, so a checkpoint written on one mesh /
device count restores resharded onto another. ``init_from`` loads params only (a converted official
checkpoint saved as a params pytree, or another run's checkpoint directory).
"""

from __future__ import annotations

import json
import logging
import signal
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from grain import checkpoint as grain_checkpoint

from bagel_jax.config import ConfigError
from bagel_jax.convert import param_subtree
from bagel_jax.convert.fixed_params import fixed_params, fixed_part
from bagel_jax.convert.run_checkpoint import (  # noqa: F401  (DATA, STATE: the layout; re-exported)
    DATA,
    STATE,
    load_any_params,
    load_params,
    saved_lora,
)
from bagel_jax.model import lora
from bagel_jax.train.state import (
    TrainState,
    abstract_state,
    checkpoint_view,
    create_train_state,
    state_shardings,
    with_fixed,
)

# --- the per-host data-iterator state item ---------------------------------------------------------


class _DataState:
    """A host's JSON-able data-iterator state, in the iterator form grain's orbax handler saves and restores.

    ``grain.checkpoint.CheckpointHandler`` calls ``get_state`` / ``set_state`` on the item it is given and writes
    one file per host, ``process_<i>-of-<n>.json``. It is handed this wrapper instead of the iterator because the
    trainer passes the state snapshotted at ``save`` (the stream moves on while the write is in flight) and gets
    it back before its iterator exists. State travels as the bytes of a grain DataLoader iterator, so the file
    holds ``json.dumps(state)``.
    """

    def __init__(self, state: Any = None):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state).encode()

    def set_state(self, raw: bytes):
        self.state = json.loads(raw)

    def start_prefetch(self):  # grain's handler calls it after set_state; a snapshot has nothing to prefetch
        pass


# --- manager ---------------------------------------------------------------------------------------


class Checkpointer:
    """``CheckpointManager`` over ``<workdir>/checkpoints`` with items ``state`` and ``data``.

    save(step, state, data_state) is asynchronous (returns once arrays are copied off device, so the next
    step may donate them); call ``wait()`` before reading what was written, ``close()`` at exit.
    ``stop_requested(step)`` is True after SIGTERM (single process) or at a multi-host preemption sync point.
    """

    def __init__(
        self,
        workdir: str,
        *,
        keep: int = 3,
        async_save: bool = True,
        handle_sigterm: bool = False,
        store_fixed: bool = False,
    ):
        # store_fixed: write the fixed params too (a run started from train.init_from: its VAE and tables came from
        # a folder a restart must not depend on); otherwise they are rebuilt from the config on restore
        self.store_fixed = bool(store_fixed)
        self.directory = epath.Path(workdir) / "checkpoints"
        # keep: the newest N steps (0 = all). Orbax deletes only after a save has committed, so the newest complete
        # checkpoint is never removed.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=int(keep) if keep else None, create=True, enable_async_checkpointing=async_save
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE, DATA))
        self._sigterm = False
        if handle_sigterm:
            self.install_sigterm_handler()

    @classmethod
    def from_config(cls, workdir: str, config, **kw) -> Checkpointer:
        kw.setdefault("store_fixed", bool(config.train.get("init_from")))
        return cls(workdir, keep=config.train.keep_checkpoints, **kw)

    # preemption
    def install_sigterm_handler(self):
        """SIGTERM sets a flag that ``stop_requested`` reports (the loop then saves and exits). Multi-host
        runs rely on JAX's preemption service instead (its sync point makes every host stop at one step)."""
        if jax.process_count() == 1:
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint at the end of this step")
        self._sigterm = True

    def stop_requested(self, step: int) -> bool:
        return self._sigterm or self.manager.reached_preemption(step)

    # save / restore
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: TrainState, data_state: Any = None, *, force: bool = True) -> bool:
        """Starts saving ``state`` (and this host's ``data_state``, JSON-able) as ``step``."""
        items = {STATE: ocp.args.StandardSave(state if self.store_fixed else _stored(state))}
        if data_state is not None:
            items[DATA] = grain_checkpoint.CheckpointSave(_DataState(data_state))
        self.check_for_errors()  # an earlier background write that failed stops the run here
        try:
            return self.manager.save(int(step), args=ocp.args.Composite(**items), force=force)
        except Exception as e:  # noqa: BLE001
            raise CheckpointWriteError(
                f"{self.directory}: writing checkpoint {step} failed ({type(e).__name__}: "
                f"{_first_line(e)}); the run stops, the previous checkpoint is intact"
            ) from e

    def restore(
        self, abstract: TrainState, step: int | None = None, *, data: bool = True, fixed: Any = None
    ) -> tuple[TrainState, Any]:
        """(state, data_state or None) of ``step`` (default latest), resharded onto ``abstract``'s shardings.

        A checkpoint written without the fixed params (``state.checkpoint_view``) is completed with ``fixed`` (their
        part of the params, e.g. ``convert.fixed_params.fixed_params``: a callable is called only then); without it
        they are absent from ``params``. One written with them (``store_fixed``) is restored whole."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
        whole = not isinstance(abstract, TrainState) or self._holds_fixed(step, abstract)
        items = {STATE: ocp.args.StandardRestore(abstract if whole else _stored(abstract))}
        data_dir = self.directory / str(step) / DATA
        has_data = data and data_dir.exists()
        if has_data:
            host_file = data_dir / f"process_{jax.process_index()}-of-{jax.process_count()}.json"  # grain's naming
            if not host_file.exists():
                raise FileNotFoundError(
                    f"{host_file}: no data-iterator state for this host (found "
                    f"{sorted(p.name for p in data_dir.iterdir())}); the host count changed "
                    "since the save, restore with data=False to restart the stream"
                )
            items[DATA] = grain_checkpoint.CheckpointRestore(_DataState())
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        state = out[STATE]
        if not whole and fixed is not None:
            state = with_fixed(state, fixed() if callable(fixed) else fixed)
        return state, (out[DATA].state if has_data else None)

    def _holds_fixed(self, step: int, abstract: TrainState) -> bool:
        """Whether checkpoint ``step`` holds the fixed params of ``abstract`` (written with ``store_fixed``)."""
        fixed = param_subtree.paths(fixed_part(abstract.params))
        if not fixed:
            return True
        with ocp.PyTreeCheckpointer() as ckptr:
            meta = ckptr.metadata(self.directory / str(step) / STATE)
        tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
        node = tree.get("params") or {}
        for key in fixed[0]:
            node = node.get(key) if isinstance(node, dict) else None
        return node is not None

    def set_aside_after(self, step: int) -> list[int]:
        """Renames the checkpoints newer than ``step`` to ``<step>.set_aside[.k]`` (kept for inspection, no longer
        resumed) so that training on from ``step`` can write those steps again. Returns the steps set aside."""
        self.wait()
        newer = [s for s in self.all_steps() if s > step]
        if newer and jax.process_index() == 0:
            for s in newer:
                target, k = self.directory / f"{s}.set_aside", 1
                while target.exists():
                    target, k = self.directory / f"{s}.set_aside.{k}", k + 1
                (self.directory / str(s)).rename(target)
        if newer:
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("bagel_jax:checkpoints_set_aside")
            self.manager.reload()
            logging.warning(
                "checkpoints %s set aside (renamed *.set_aside): training continues from step %d", newer, step
            )
        return newer

    def check_for_errors(self):
        """Raises ``CheckpointWriteError`` if a background save has failed (the previous checkpoint is intact)."""
        try:
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001  (orbax re-raises whatever the writer thread hit)
            raise CheckpointWriteError(
                f"{self.directory}: writing a checkpoint failed ({type(e).__name__}: "
                f"{_first_line(e)}); the run stops, the previous checkpoint is intact"
            ) from e

    def wait(self):
        self.manager.wait_until_finished()
        self.check_for_errors()

    def close(self):
        try:
            self.wait()
        finally:
            self.manager.close()


def _stored(state: Any) -> Any:
    """What is written of ``state``: a ``TrainState`` less its fixed params (``state.checkpoint_view``); any other
    pytree as it is."""
    return checkpoint_view(state) if isinstance(state, TrainState) else state


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions, ...)."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


# --- params only (init_from) -----------------------------------------------------------------------


def check_init_from(config) -> None:
    """``train.init_from`` fits ``config.model`` (headers and metadata only): a release folder's files are readable
    and its shapes those of the model; a run's or params tree's LoRA adapters are on the layers the model adapts
    (``lora_init_plan``). Raises ``ConfigError`` naming ``train.init_from`` or the key, and the file."""
    from bagel_jax.convert.release_sharded import CheckpointError, check_release, is_release

    path = config.train.init_from
    if path and is_release(path):
        try:
            check_release(path, config.model)
        except CheckpointError as e:
            raise ConfigError(f"train.init_from: {e}") from None
    elif path:
        lora_init_plan(config)


def lora_init_plan(config) -> str:
    """How the params of ``train.init_from`` (a run or a params tree) meet this model's LoRA adapters:

    - ``"load"``: read as saved; adapters the file holds where the model has none (``model.lora.rank=0``) are merged
      into their kernels (``run_checkpoint.load_params``), the same adapters (rank, alpha, layers) load as they are;
    - ``"fresh"``: the file has no adapters: the base is read, the model's adapters stay at init (B = 0);
    - ``"merge_fresh"``: another rank or alpha: the file's adapters are merged into the base and the model's start
      at init, so step 0 computes what the saved run does.

    Adapters on other layers (``model.lora.experts`` / ``targets``) raise a one-line ``ConfigError`` naming the key
    and both values. Reads the checkpoint's metadata only."""
    path = config.train.init_from
    try:
        saved = saved_lora(path)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None  # "train.init_from: ... does not exist"
    except Exception as e:  # noqa: BLE001  (orbax raises whatever the folder gives it)
        raise ConfigError(
            f"train.init_from: {path} is not a release folder, a run's workdir or checkpoint, or a params tree "
            f"({type(e).__name__}: {_first_line(e)})"
        ) from None
    if not lora.enabled(config.model):
        return "load"
    ours = config.model.lora
    if saved is None:
        return "fresh"
    for key in ("experts", "targets"):
        want = tuple(sorted(ours[key]))
        if saved[key] != want:
            raise ConfigError(
                f"model.lora.{key}: train.init_from {path} has adapters for {key} {saved[key]}, this model for "
                f"{want}; set model.lora.{key}={saved[key]} to continue them, or model.lora.rank=0 to load it merged"
            )
    alpha = float(ours.alpha) if saved["alpha"] is None else saved["alpha"]  # a params tree: alpha as configured
    if (saved["rank"], alpha) == (int(ours.rank), float(ours.alpha)):
        return "load"
    return "merge_fresh"


def load_init_params(config, shardings, like) -> Any:
    """The params of ``train.init_from`` on ``shardings`` with ``like``'s dtypes (or the part of them ``like``
    holds): a release folder (each tensor read straight into its shards), a params pytree the converter saved, or
    another run's workdir / checkpoint (its LoRA adapters matched to this model's as ``lora_init_plan`` says)."""
    from bagel_jax.convert.release_sharded import CheckpointError, is_release

    path = config.train.init_from
    try:
        plan = "release" if is_release(path) else lora_init_plan(config)
        if plan in ("fresh", "merge_fresh"):
            # the base from the file (its adapters, if any, merged in), this model's adapters as ``like`` has them
            why = "it holds none" if plan == "fresh" else "its own, of another rank or alpha, are merged into the base"
            logging.info("%s: this model's LoRA adapters start at init (B = 0): %s", path, why)
            abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), like, shardings)
            base = lora.without_adapters(like)
            alpha = config.model.lora.alpha
            loaded = load_params(path, lora.without_adapters(abstract), base=base, lora_alpha=alpha)
            return lora.with_adapters(loaded, like)
        return load_any_params(path, config.model, shardings, like)
    except CheckpointError as e:
        raise ConfigError(f"train.init_from: {e}") from None


def restore_or_init(
    ckpt: Checkpointer,
    init_fn,
    optimizer,
    mesh,
    rules,
    rng: jax.Array,
    config,
    *,
    step: int | None = None,
) -> tuple[TrainState, TrainState, Any]:
    """(state, shardings, data_state): resumes checkpoint ``step`` (default: the latest) if the workdir has one,
    else creates a fresh sharded state and, if ``train.init_from`` is set, loads its params (EMA = params).

    ``train.init_from`` is read on a fresh start only (a restart resumes its own checkpoint: a release folder
    (``check_init_from`` runs before the state is created), a converted params pytree or a run's workdir), except
    for the fixed params (the frozen VAE, the sin-cos tables). Without ``train.init_from`` checkpoints leave them out
    and ``convert.fixed_params`` builds them the same way on a fresh start and on a resume (init →
    ``model.vae.init_from``); with it, they came from that folder and are checkpointed (``store_fixed``)."""
    freeze = tuple(config.train.freeze)
    shardings = state_shardings(init_fn, optimizer, mesh, rules, freeze)
    if ckpt.latest_step() is not None:
        abstract = abstract_state(init_fn, optimizer, mesh, rules, freeze)
        fixed = lambda: _fixed_params(config, init_fn, rng, shardings.params)  # noqa: E731  (only if not stored)
        state, data_state = ckpt.restore(abstract, step, fixed=fixed)
        logging.info("resumed from %s at step %d", ckpt.directory, int(state.step))
        return state, shardings, data_state
    if config.train.init_from:
        check_init_from(config)
    state, shardings = create_train_state(init_fn, optimizer, mesh, rules, rng, freeze)
    if config.train.init_from:
        params = load_init_params(config, shardings.params, state.params)
        copy = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings.ema_params)
        state = state.replace(params=params, ema_params=copy(param_subtree.like(params, state.ema_params)))
        logging.info("params loaded from %s", config.train.init_from)
    start = fixed_part(state.params)  # the init's, or train.init_from's
    return with_fixed(state, _fixed_params(config, init_fn, rng, shardings.params, start)), shardings, None


def _fixed_params(config, init_fn, rng: jax.Array, param_shardings: Any, start: Any = None) -> Any:
    return fixed_params(config, init_fn, fixed_part(param_shardings), rng, start=start)
