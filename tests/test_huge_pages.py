"""``bagel_jax.huge_pages``: a CPU program re-executes itself once with glibc's huge-page tunable, and then really
gets transparent huge pages for glibc's large buffers."""

from __future__ import annotations

import importlib.machinery
import json
import os
import subprocess
import sys
import types

import jax
import pytest

from bagel_jax import huge_pages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "tunables, want",
    [
        ("", "glibc.malloc.hugetlb=1"),
        ("glibc.malloc.arena_max=2", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
        ("glibc.malloc.arena_max=2::", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
        ("glibc.malloc.hugetlb=0", None),  # the user's own choice stands
        ("glibc.malloc.arena_max=1:glibc.malloc.hugetlb=2", None),
    ],
)
def test_with_huge_pages(tunables, want):
    assert huge_pages.with_huge_pages(tunables) == want


def test_thp_mode(tmp_path):
    path = tmp_path / "enabled"
    for text, mode in [("always [madvise] never\n", "madvise"), ("[always] madvise never", "always"), ("", None)]:
        path.write_text(text)
        assert huge_pages.thp_mode(str(path)) == mode
    assert huge_pages.thp_mode(str(tmp_path / "missing")) is None


def test_only_bagel_jax_programs_reexecute(monkeypatch):
    """A test runner (this process), a notebook or another program importing bagel_jax runs as it started."""
    assert not huge_pages.is_bagel_jax_program()
    assert huge_pages.reexec_environment({"JAX_PLATFORMS": "cpu"}) is None
    huge_pages.reexec_with_huge_pages()  # returns (does not replace the test process)
    for name, ours in [("bagel_jax.train.__main__", True), ("bagel_jax.train.vae_train", True), ("pytest", False)]:
        main = types.ModuleType("__main__")
        main.__spec__ = importlib.machinery.ModuleSpec(name, None)
        monkeypatch.setitem(sys.modules, "__main__", main)
        assert huge_pages.is_bagel_jax_program() is ours
    jax.devices()  # this process's backends are started: it runs as it is, even as a program
    assert huge_pages.jax_started() and huge_pages.reexec_environment({"JAX_PLATFORMS": "cpu"}, program=True) is None


def _child(env_extra: dict[str, str], stdin: bool = False) -> dict:
    """A fresh process (a program) that calls reexec_with_huge_pages, then touches a 256 MiB malloc'd buffer (numpy)
    and reports its tunables, argv and how much of its anonymous memory is on huge pages."""
    code = (
        "import json, os, sys\n"
        "from bagel_jax import huge_pages\n"
        "huge_pages.reexec_with_huge_pages(program=True)\n"
        "import numpy as np\n"
        "a = np.empty(64 * 2**20, np.float32); a.fill(1.0)\n"
        "huge = 0\n"
        "for line in open('/proc/self/smaps_rollup'):\n"
        "    if line.startswith('AnonHugePages:'): huge = int(line.split()[1])\n"
        "print(json.dumps(dict(tunables=os.environ.get('GLIBC_TUNABLES'), argv=sys.argv[1:], huge_kib=huge,"
        " sum=float(a[::4096].sum()))))\n"
    )
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", **env_extra}
    env.pop("GLIBC_TUNABLES", None)
    argv = [sys.executable, "-", "--an-argument"] if stdin else [sys.executable, "-c", code, "--an-argument"]
    out = subprocess.run(
        argv, input=code if stdin else None, env=env, capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables and /proc are Linux's")
def test_cpu_program_reexecutes_with_huge_pages():
    applies = (huge_pages.glibc_version() or (0, 0)) >= huge_pages.MIN_GLIBC and huge_pages.thp_mode() == "madvise"
    got = _child({})
    assert got["argv"] == ["--an-argument"] and got["sum"] == 64 * 2**20 / 4096
    if not applies:  # this machine cannot: the process runs as started
        assert got["tunables"] is None
        return
    assert got["tunables"] == "glibc.malloc.hugetlb=1"
    assert got["huge_kib"] >= 2048, got  # the buffer is (at least partly) on 2 MiB pages
    off = _child({huge_pages.OPT_OUT: "0"})
    assert off["tunables"] is None and off["huge_kib"] < got["huge_kib"], (off, got)
    accelerator = _child({"JAX_PLATFORMS": "tpu"})  # not a CPU program
    assert accelerator["tunables"] is None
    from_stdin = _child({}, stdin=True)  # a program read from stdin cannot be run again: it runs as started
    assert from_stdin["tunables"] is None and from_stdin["sum"] == got["sum"]
