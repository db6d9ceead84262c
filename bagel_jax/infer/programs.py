"""Compiled inference programs shared by every caller of the same model configuration.

``jax.jit`` keeps its compiled executables on the jitted function object, so a program built anew per
``Inferencer`` recompiles. ``shared_program`` builds each program once per (program, model config) and hands the
same jitted function to every later caller (another ``Inferencer`` on other params, the trainer's next eval):
the same shapes never compile twice in a process. A program is traced under its caller's mesh and logical-axis
rules (``placement.py``), which are part of its key.

Attention in these programs: the Pallas kernel on TPU, else the dense reference. A KV-cached step's queries are a
few tokens (one decoded token, one image) against a single-document cache, where a block-sparse schedule has
nothing to skip but padding and its per-call row limit (``attention/block_map.py``) would cap the batch (CFG
branches × requests); the contexts' prefill follows the same choice.
"""

from __future__ import annotations

from collections.abc import Callable

from bagel_jax.attention import resolve_impl
from bagel_jax.infer.placement import Placement, placement_for

_PROGRAMS: dict[tuple, Callable] = {}


def inference_model(model):
    """``model`` with the attention the inference programs use (see the module docstring)."""
    if resolve_impl(model.cfg.attention_impl) in ("tpu", "reference"):
        return model
    cfg = model.cfg.copy_and_resolve_references()
    cfg.attention_impl = "reference"
    return model.clone(cfg=cfg)


def shared_program(model, name: str, build: Callable, placement_key: tuple = ()) -> Callable:
    """``build(inference_model(model))`` (a jitted function) for ``model``'s class and config (and the placement it
    is traced under, ``Placement.key``), built on first use."""
    key = (name, type(model).__name__, model.cfg.to_json_best_effort(sort_keys=True), placement_key)
    if key not in _PROGRAMS:
        _PROGRAMS[key] = build(inference_model(model))
    return _PROGRAMS[key]


class ProgramRunner:
    """Base of the cached samplers: the model, its params and tokenizer, the batch and context limits, where they
    run (``placement``: default the params' mesh, else one device) and the jitted program ``PROGRAM`` built by
    ``build`` (shared by every instance on the same model config and placement)."""

    PROGRAM: str = ""

    def __init__(
        self, model, params, tokenizer, *, max_batch: int, max_context_tokens: int, placement: Placement | None = None
    ):
        self.placement = placement if placement is not None else placement_for(params)
        self.model, self.params, self.tokenizer = model, self.placement.put(params), tokenizer
        self.max_batch, self.max_context_tokens = max_batch, max_context_tokens
        self._program = shared_program(model, self.PROGRAM, self.build, self.placement.key)

    build: Callable  # a subclass's ``staticmethod(model -> jitted program)``

    def _run(self, *args, **static):
        """``PROGRAM`` on ``args`` (host values or arrays on the mesh) → numpy results on every process."""
        return self.call(self._program, *args, **static)

    def call(self, program: Callable, *args, **static):
        """A jitted ``program`` under this runner's mesh and rules, its host inputs put on the mesh, its results
        fetched to numpy on every process."""
        with self.placement.context():
            return self.placement.fetch(program(*self.placement.put(args), **static))
