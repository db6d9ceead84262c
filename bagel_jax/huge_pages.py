"""Transparent huge pages for XLA:CPU's buffers: a CPU program re-executes itself once, before jax is imported,
with glibc's ``glibc.malloc.hugetlb=1`` tunable.

Why: XLA:CPU allocates a program's temporaries as one buffer per run (the 256×4 / 4K train step's is 725 MB), and
glibc serves a buffer that large with a fresh ``mmap`` and returns it with ``munmap``. So every step faulted in
~180K pages of 4 KiB (0.3 s of kernel time a step, ~16% of the step's CPU time) and then walked them through a TLB of
4 KiB entries. With the tunable, glibc advises the kernel to back its mmapped chunks with transparent huge pages
(``madvise``): the 256×4 / 4K step 0.95 → 0.85 s on a 2-core CPU (docs/EXPERIMENTS.md; the official PyTorch step
is unchanged by it). glibc reads tunables only when a process starts, hence the re-exec.

It applies only where it can and should: Linux, glibc ≥ 2.35, the kernel's THP mode ``madvise`` (with ``always``
huge pages are already used; with ``never`` they cannot be), a process that runs on CPU (``JAX_PLATFORMS=cpu``, or
unset on a machine with no TPU and no GPU), one of bagel_jax's programs (``python -m bagel_jax...``, or a script
that says so: a notebook, a test runner or another program importing bagel_jax keeps going as it started) that has
not started jax's backends yet, and one that can be run again (not a program read from stdin).
``BAGEL_JAX_HUGE_PAGES=0`` turns it off. Nothing else changes: same results, bit for bit.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping

TUNABLE, SETTING = "glibc.malloc.hugetlb", "1"
OPT_OUT = "BAGEL_JAX_HUGE_PAGES"  # "0": run as started
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
MIN_GLIBC = (2, 35)  # the first glibc with glibc.malloc.hugetlb


def thp_mode(path: str = THP_ENABLED) -> str | None:
    """The kernel's transparent-huge-page mode (``always`` / ``madvise`` / ``never``), None where it cannot say."""
    try:
        with open(path) as f:
            match = re.search(r"\[(\w+)\]", f.read())
    except OSError:
        return None
    return match.group(1) if match else None


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the C library this process runs on, None where it is not glibc."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    except (AttributeError, ValueError, OSError):
        return None
    parts = re.match(r"(\d+)\.(\d+)", version)
    return (int(parts.group(1)), int(parts.group(2))) if name == "glibc" and parts else None


def with_huge_pages(tunables: str) -> str | None:
    """``GLIBC_TUNABLES`` with ``glibc.malloc.hugetlb=1`` added; None when it already sets hugetlb (to anything)."""
    entries = [t for t in tunables.split(":") if t]
    if any(t.split("=")[0] == TUNABLE for t in entries):
        return None
    return ":".join([*entries, f"{TUNABLE}={SETTING}"])


def runs_on_cpu(env: Mapping[str, str]) -> bool:
    """Whether a bagel_jax program started with ``env`` runs on CPU (``cli.quiet_platforms``'s rule)."""
    from bagel_jax import cli

    platforms = env.get("JAX_PLATFORMS")
    if platforms is not None:
        return platforms.strip().lower() == "cpu"
    return not (cli.tpu_may_be_present() or cli.gpu_may_be_present())


def is_bagel_jax_program() -> bool:
    """Whether this process is one of bagel_jax's programs (``python -m bagel_jax...``): not a test runner, a
    notebook or another program that imports bagel_jax."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return bool(spec and spec.name.split(".")[0] == "bagel_jax")


def jax_started() -> bool:
    """Whether this process has initialised jax's backends (importing jax alone does not)."""
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except Exception:  # a jax without this (private) probe: assume started
        return True


def reexec_environment(env: Mapping[str, str] | None = None, program: bool | None = None) -> dict[str, str] | None:
    """The environment to re-execute this process with, or None when it should run as it is. ``program``: whether
    this process is a program that may re-execute (default ``is_bagel_jax_program()``)."""
    env = os.environ if env is None else env
    if env.get(OPT_OUT, "1").strip() == "0" or not sys.platform.startswith("linux"):
        return None
    if not (is_bagel_jax_program() if program is None else program) or jax_started():
        return None
    if sys.argv[:1] in ([""], ["-"]):  # an interactive session or a program read from stdin cannot be run again
        return None
    version = glibc_version()
    if version is None or version < MIN_GLIBC or thp_mode() != "madvise" or not runs_on_cpu(env):
        return None
    tunables = with_huge_pages(env.get("GLIBC_TUNABLES", ""))
    return None if tunables is None else {**env, "GLIBC_TUNABLES": tunables}


def reexec_with_huge_pages(program: bool | None = None) -> None:
    """Re-executes this process (same interpreter, same command line) with huge pages for glibc's large buffers,
    where ``reexec_environment`` says so; returns otherwise. Call first thing in a program's main; a script that is
    not a ``bagel_jax`` module passes ``program=True``."""
    env = reexec_environment(program=program)
    if env is None:
        return
    argv = [sys.executable, *getattr(sys, "orig_argv", [sys.executable, *sys.argv])[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)
