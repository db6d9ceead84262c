"""XLA:CPU compile options for the programs that run convolutions (the VAE), and ``jit`` that applies them.

On CPU, XLA (jax 0.10) hands every convolution to YNNPACK by default (``xla_cpu_experimental_ynn_fusion_type``
lists ``LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION``). Its 3×3 convolutions over VAE-sized activations ran at about
half the speed of XLA's own (Eigen) convolution on this project's CPUs: the tiny VAE's encode of 40 images of 48 px
93 → 57 ms, the FLUX-size encoder (ch 128) 760 → 671 ms, a VAE train step 1.3-1.4× faster (docs/DESIGN_NOTES.md
59). ``cpu_compiler_options`` takes the current list (XLA's defaults with any ``XLA_FLAGS`` applied) and drops
only the convolution entry, so dots and reductions keep their YNNPACK paths, a user's own ``XLA_FLAGS`` choice is
kept, and nothing changes when the entry is absent (another jax, or the user removed it) or on other backends.
Only the kernel choice changes: a convolution's value differs by float rounding.
"""

from __future__ import annotations

import functools
import re

import jax

_OPTION = "xla_cpu_experimental_ynn_fusion_type"
_CONVOLUTION = "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"


def _current_ynn_fusion_types() -> tuple[str, ...] | None:
    """The YNNPACK fusion types a compile gets now (defaults + XLA_FLAGS), or None when jax cannot say."""
    try:
        from jax._src import compiler

        options = compiler.get_compile_options(1, 1)
        build_options = options.executable_build_options  # keep both alive: debug_options points into them
        text = str(build_options.debug_options)
    except Exception:  # a jax without this (private) path: leave XLA's choice alone
        return None
    return tuple(re.findall(rf"{_OPTION}: (\w+)", text))


@functools.cache
def _options_without_ynn_convolution() -> tuple[tuple[str, str], ...]:
    types = _current_ynn_fusion_types()
    if not types or _CONVOLUTION not in types:
        return ()
    kept = [t for t in types if t != _CONVOLUTION]
    if not kept:  # an empty value would not clear the list; leave it
        return ()
    options = ((_OPTION, ",".join(kept)),)
    try:  # this XLA:CPU must accept the value as a per-compile option (probed on a CPU device), or we set nothing
        cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
        probe = jax.ShapeDtypeStruct((2,), "float32", sharding=cpu)
        jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(probe).compile()
    except Exception:
        return ()
    return options


def cpu_compiler_options(platform: str | None = None) -> dict[str, str] | None:
    """``compiler_options`` for ``jax.jit`` on ``platform`` (default: jax's default backend): XLA's own convolutions
    on CPU; None (nothing to set) elsewhere or when this jax has no YNNPACK convolution to turn off."""
    if (platform or jax.default_backend()) != "cpu":
        return None
    return dict(_options_without_ynn_convolution()) or None


def jit(fn=None, *, platform: str | None = None, **jit_kwargs):
    """``jax.jit`` with ``cpu_compiler_options(platform)``; usable as ``jit(fn, ...)`` or ``@jit``."""
    if fn is None:
        return functools.partial(jit, platform=platform, **jit_kwargs)
    return jax.jit(fn, compiler_options=cpu_compiler_options(platform), **jit_kwargs)
