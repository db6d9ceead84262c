"""Compiled inference programs shared by every caller of the same model configuration.

``jax.jit`` keeps its compiled executables on the jitted function object, so a program built anew per
``Inferencer`` recompiles. ``shared_program`` builds each program once per (program, model config) and hands the
same jitted function to every later caller (another ``Inferencer`` on other params, the trainer's next eval):
the same shapes never compile twice in a process.

Attention in these programs: the Pallas kernel on TPU, else the dense reference. A KV-cached step's queries are a
few tokens (one decoded token, one image) against a single-document cache, where a block-sparse schedule has
nothing to skip but padding and its per-call row limit (``attention/block_map.py``) would cap the batch (CFG
branches × requests); the contexts' prefill follows the same choice.
"""

from __future__ import annotations

from collections.abc import Callable

from bagel_jax.attention import resolve_impl

_PROGRAMS: dict[tuple[str, str, str], Callable] = {}


def inference_model(model):
    """``model`` with the attention the inference programs use (see the module docstring)."""
    if resolve_impl(model.cfg.attention_impl) in ("tpu", "reference"):
        return model
    cfg = model.cfg.copy_and_resolve_references()
    cfg.attention_impl = "reference"
    return model.clone(cfg=cfg)


def shared_program(model, name: str, build: Callable) -> Callable:
    """``build(inference_model(model))`` (a jitted function) for ``model``'s class and config, built on first use."""
    key = (name, type(model).__name__, model.cfg.to_json_best_effort(sort_keys=True))
    if key not in _PROGRAMS:
        _PROGRAMS[key] = build(inference_model(model))
    return _PROGRAMS[key]


class ProgramRunner:
    """Base of the cached samplers: the model, its params and tokenizer, the batch and context limits, and the
    jitted program ``PROGRAM`` built by ``build`` (shared by every instance on the same model config)."""

    PROGRAM: str = ""

    def __init__(self, model, params, tokenizer, *, max_batch: int, max_context_tokens: int):
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.max_batch, self.max_context_tokens = max_batch, max_context_tokens
        self._run = shared_program(model, self.PROGRAM, self.build)

    build: Callable  # a subclass's ``staticmethod(model -> jitted program)``
