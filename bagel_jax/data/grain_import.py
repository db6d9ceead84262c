"""``grain``, imported so that it does not pull in jax: ``from bagel_jax.data.grain_import import grain``.

grain imports jax opportunistically when it is installed (its profiler annotations and its ``tree_lib``), and
falls back to pure-Python versions when the import fails. The data pipeline needs neither, and every grain worker
process imports this package: without the guard each worker would load jax (~1 s and ~100 MB) for nothing. So when
jax is not loaded yet, grain is imported with ``jax`` marked unimportable, and the mark is removed right after; a
process that has already imported jax (the trainer) gets grain's jax-backed versions as before.
"""

from __future__ import annotations

import importlib
import logging
import sys


def _not_the_profiler_notice(record: logging.LogRecord) -> bool:
    return "jax profiler" not in record.getMessage()  # grain's notice that its jax-backed profiler is not loaded


def _import_grain():
    if "grain" in sys.modules or "jax" in sys.modules:
        return importlib.import_module("grain")
    absl_logger = logging.getLogger("absl")
    sys.modules["jax"] = None  # `import jax` (and jax.*) raises ImportError while grain initialises
    absl_logger.addFilter(_not_the_profiler_notice)
    try:
        return importlib.import_module("grain")
    finally:
        absl_logger.removeFilter(_not_the_profiler_notice)
        if sys.modules.get("jax", 0) is None:
            del sys.modules["jax"]


grain = _import_grain()
