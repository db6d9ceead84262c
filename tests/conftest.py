"""Test environment: must run before anything imports jax (8 simulated CPU devices, offline hubs)."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# JAX's persistent compilation cache, shared by the xdist workers, the subprocesses the tests start (inherited) and
# CI's two steps: many tests compile the same tiny programs (a trainer run, its resume, the 1-device oracle of a mesh
# test). Entries are keyed by the program, devices, compile options and jax/XLA versions, so a stale one is never
# read. An empty JAX_COMPILATION_CACHE_DIR turns it off.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"bagel_jax_tests_xla_cache_{os.getuid()}")
)
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2 * 2**30))  # bytes; least recently used go first

import importlib.util  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")  # fp32 parity tests compare to 1e-5


def pytest_runtest_setup(item):
    """Tests marked ``tpu`` fail (never skip) without libtpu: the README installs it, so a missing one is a broken
    install, and a skip would let CI pass without the AOT checks. Leave them out with -m "not slow and not tpu"."""
    if item.get_closest_marker("tpu") and importlib.util.find_spec("libtpu") is None:
        pytest.fail('libtpu is missing: pip install -e ".[test,tpu]" (README), or deselect: -m "not slow and not tpu"')


@pytest.fixture(autouse=True)
def _no_cache_writes_for_tpu_programs(request):
    """A compile-only TPU executable cannot be loaded back from the compilation cache (no TPU client): tests marked
    ``tpu`` write no entries, so a rerun does not read one and warn."""
    if request.node.get_closest_marker("tpu") is None:
        yield
        return
    from bagel_jax.aot import no_compilation_cache_writes

    with no_compilation_cache_writes():
        yield
