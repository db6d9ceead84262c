"""bagel_jax.xla_cpu: XLA's own convolutions on CPU, everything else as XLA chose, same values."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from bagel_jax import xla_cpu

_CONV = "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"


def _conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _ynn_fusion_ops(compiled_text: str) -> list[str]:
    """For each YNNPACK fusion of a compiled module: "convolution" when its computation convolves, else "other"."""
    bodies, name = {}, None
    for line in compiled_text.splitlines():
        header = re.match(r"\s*%?([\w.\-]+) .*\{\s*$", line)
        if header and "=" not in line.split("{")[0]:
            name = header.group(1)
            bodies[name] = ""
        elif name is not None:
            bodies[name] += line + "\n"
    ops = []
    for line in compiled_text.splitlines():
        called = re.search(r"calls=%?([\w.\-]+)", line)
        if '"__ynn_fusion"' in line and called:
            ops.append("convolution" if " convolution(" in bodies.get(called.group(1), "") else "other")
    return ops


def test_options_drop_only_the_convolution_entry():
    types = xla_cpu._current_ynn_fusion_types()
    options = xla_cpu.cpu_compiler_options("cpu")
    if types is None or _CONV not in types:
        assert options is None
        return
    kept = [t for t in types if t != _CONV]
    assert options == {"xla_cpu_experimental_ynn_fusion_type": ",".join(kept)}
    for platform in ("tpu", "gpu", "cuda"):
        assert xla_cpu.cpu_compiler_options(platform) is None


def test_jit_runs_convolutions_outside_ynnpack_with_the_same_values():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 16, 12, 32)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 32, 32)), jnp.float32)
    plain, ours = jax.jit(_conv), xla_cpu.jit(_conv, platform="cpu")
    ref = np.asarray(plain(x, w))  # float rounding only: errors relative to the output's scale
    np.testing.assert_allclose(np.asarray(ours(x, w)), ref, rtol=0, atol=1e-6 * np.abs(ref).max())
    ours_text = ours.lower(x, w).compile().as_text()
    assert "convolution" not in _ynn_fusion_ops(ours_text)
    if xla_cpu.cpu_compiler_options("cpu") is not None:  # this jax puts convolutions in YNNPACK by default
        assert "convolution" in _ynn_fusion_ops(plain.lower(x, w).compile().as_text())

    grad_plain = jax.jit(jax.grad(lambda w: jnp.sum(jnp.sin(_conv(x, w)))))(w)
    grad_ours = xla_cpu.jit(jax.grad(lambda w: jnp.sum(jnp.sin(_conv(x, w)))), platform="cpu")(w)
    scale = np.abs(np.asarray(grad_plain)).max()
    np.testing.assert_allclose(np.asarray(grad_ours), np.asarray(grad_plain), rtol=0, atol=1e-5 * scale)


def test_decorator_form_and_jit_kwargs():
    @xla_cpu.jit(static_argnames="n")
    def repeat(x, n):
        return jnp.tile(x, n)

    np.testing.assert_array_equal(np.asarray(repeat(jnp.arange(3), n=2)), [0, 1, 2, 0, 1, 2])


def test_user_xla_flags_choice_is_kept():
    """A user who already removed (or set) the YNNPACK types in XLA_FLAGS gets no override."""
    code = "from bagel_jax import xla_cpu; print(xla_cpu.cpu_compiler_options('cpu'))"
    env = dict(os.environ, XLA_FLAGS="--xla_cpu_experimental_ynn_fusion_type=-individual_convolution")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "None"
