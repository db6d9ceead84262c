"""README.md's commands: every one is checked, and the cheap ones run as written.

Checked, for every command of README's ```bash blocks (continuation lines joined, comments dropped, split at &&):
* ``python -m bagel_jax.X``: the module exists; ``python path.py``: the script exists;
* every ``--flag`` is one its entry point defines (absl ``DEFINE_*`` or argparse ``add_argument`` in its file or in a
  bagel_jax module that file imports, found statically);
* every path it names under a top-level folder of the repository (``configs/x.py[:arg]``, ``launch/...``) exists;
* ``--config=`` files load, and with their ``--config.a.b=v`` overrides applied pass ``bagel_jax.config.validate``;
  ``--sweep=`` files load and every point validates (``launch_utils.load_points``);
* ``pip install -e ".[extras]"``: setup.py defines the extras;
* the first block is install / test (ending in ``pytest -q -n 2``) / train, and every command that ``.ci/run``
  runs as "README: install" or "README: test" is one of its commands.
Every relative link of README.md points at a file that exists.

Run as written (a few seconds each; ``/tmp/`` becomes a temporary directory, ``python`` this interpreter):
* ``python -m bagel_jax.infer.cli --random_tiny --mode=t2i ...``: writes a random tiny checkpoint, samples an image;
* ``python launch/xm_launch.py ... --dry_run``: prints the XManager jobs of the sweep, launches nothing.
Only checked (minutes to hours, or a TPU, a release checkpoint or the network): pip install, the lint + test line,
every training, evaluation, AOT-planning and local-sweep command, and inference from a release checkpoint.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from bagel_jax import launch_utils
from bagel_jax.config import ConfigError, validate

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TOP = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")}
RUN_MARKERS = ("--random_tiny", "--dry_run")  # a command holding one of these is cheap: it is run


def bash_commands(text: str) -> list[tuple[int, list[str]]]:
    """(block number, argv) of every command in ```bash blocks, split at ``&&``."""
    out = []
    for b, block in enumerate(re.findall(r"```bash\n(.*?)```", text, re.S)):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            while argv:
                cut = argv.index("&&") if "&&" in argv else len(argv)
                out.append((b, argv[:cut]))
                argv = argv[cut + 1 :]
    return out


def _module_files(name: str) -> list[Path]:
    base = ROOT.joinpath(*name.split("."))
    return [p for p in (base.with_suffix(".py"), base / "__init__.py", base / "__main__.py") if p.is_file()]


@cache
def _file_flags(path: Path) -> tuple[frozenset, frozenset, tuple]:
    """Flags one file defines: (all names, names of config-file flags, bagel_jax modules it imports)."""
    names, config_files, imports = set(), set(), []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            fn = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            first = node.args[0].value if node.args and isinstance(node.args[0], ast.Constant) else None
            if fn.startswith("DEFINE_") and isinstance(first, str):
                names.add(first)
                if fn in ("DEFINE_config_file", "DEFINE_config_dict"):
                    config_files.add(first)
            elif fn == "add_argument":
                names.update(
                    a.value[2:]
                    for a in node.args
                    if isinstance(a, ast.Constant) and isinstance(a.value, str) and a.value.startswith("--")
                )
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("bagel_jax"):
            imports += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            imports += [a.name for a in node.names if a.name.startswith("bagel_jax")]
    return frozenset(names), frozenset(config_files), tuple(imports)


def entry_flags(entry: Path) -> tuple[set[str], set[str]]:
    """Flags an entry point defines, following its (and its imports') bagel_jax imports and parent packages."""
    names, config_files, seen, todo = set(), set(), set(), [entry]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        file_names, file_configs, imports = _file_flags(path)
        names |= file_names
        config_files |= file_configs
        for module in imports:
            parts = module.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__ too
                todo += [p for p in _module_files(".".join(parts[:i])) if p.name != "__main__.py"]
    return names, config_files


def _setup_extras() -> set[str]:
    for node in ast.walk(ast.parse((ROOT / "setup.py").read_text())):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "EXTRAS" for t in node.targets):
            return {k.value for k in node.value.keys}
    raise AssertionError("setup.py: no EXTRAS dict")


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _repo_path_errors(token: str) -> list[str]:
    path, _ = launch_utils.split_file_arg(token)
    if "/" in path and path.split("/")[0] in TOP and not (ROOT / path).exists():
        return [f"{path}: no such file in the repository"]
    return []


def check_command(argv: list[str]) -> list[str]:
    """Problems with one README command (empty: fine)."""
    errors = []
    for token in argv:
        errors += _repo_path_errors(token.split("=", 1)[-1])
    if argv[0] == "pip":
        for spec in argv[1:]:
            if "[" in spec:
                unknown = set(spec[spec.index("[") + 1 : spec.index("]")].split(",")) - _setup_extras()
                errors += [f"{spec}: setup.py has no extra {sorted(unknown)}"] if unknown else []
        return errors
    if argv[0] in ("pytest", "ruff"):
        return errors
    if argv[0] not in ("python", "python3") or len(argv) < 2:
        return errors + [f"{argv[0]}: a command this test does not know; teach tests/test_readme.py to check it"]
    if argv[1] == "-m":
        files = _module_files(argv[2])
        if not files or not argv[2].startswith("bagel_jax"):
            return errors + [f"python -m {argv[2]}: no such module in the repository"]
        entry, args = files[-1], argv[3:]
    else:
        entry, args = ROOT / argv[1], argv[2:]
        if not entry.is_file():
            return errors + [f"python {argv[1]}: no such script"]
    names, config_files = entry_flags(entry)
    flags = dict(a[2:].partition("=")[::2] for a in args if a.startswith("--"))
    overrides = {k[len("config.") :]: _parse_value(v) for k, v in flags.items() if k.startswith("config.")}
    for name in flags:
        if name.startswith("config.") and ("config" in config_files or entry in ARGPARSE_OVERRIDES):
            continue
        if name not in names and not (name.startswith("no") and name[2:] in names):
            errors.append(f"--{name}: not a flag of {entry.relative_to(ROOT)}")
    config = flags.get("config", "")
    if config.split(":")[0].endswith(".py") and (ROOT / launch_utils.split_file_arg(config)[0]).is_file():
        try:
            points = launch_utils.load_points(
                str(ROOT / config), str(ROOT / flags["sweep"]) if "sweep" in flags else None
            )
            for point in points:
                validate(
                    launch_utils.apply_overrides(launch_utils.load_config(str(ROOT / config)), {**point, **overrides})
                )
        except (ConfigError, launch_utils.LaunchError, ValueError) as e:
            errors.append(f"--config={config}: {e}")
    return errors


# argparse entry points that take ``--config.KEY=VALUE`` overrides of their ``--config`` file themselves
ARGPARSE_OVERRIDES = {ROOT / "bagel_jax" / "infer" / "cli.py"}

README_COMMANDS = bash_commands(README.read_text())
COMMANDS = README_COMMANDS + bash_commands((ROOT / "docs" / "USAGE.md").read_text())  # README's, continued


def _name(argv: list[str]) -> str:
    return " ".join(argv[:4])[:60]


@pytest.mark.parametrize("argv", [c for _, c in COMMANDS], ids=[_name(c) for _, c in COMMANDS])
def test_command_checks(argv):
    assert check_command(argv) == []


def test_first_block_is_install_test_train():
    first = [" ".join(argv) for b, argv in README_COMMANDS if b == 0]
    assert first[0].startswith("pip install") and first[-1].startswith("python -m bagel_jax.train"), first
    test_line = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)[0].splitlines()[1]
    assert test_line.split("&&")[-1].strip() == "pytest -q -n 2", test_line
    ci, marker = [], None
    for line in (ROOT / ".ci" / "run").read_text().splitlines():
        if line.startswith("# ---"):
            marker = line if "README:" in line else None
        elif marker and line.strip() and not line.startswith(("#", "echo", "start=")):
            ci += [" ".join(shlex.split(seg)).replace("pip install -q ", "pip install ") for seg in line.split("&&")]
    assert ci and all(seg in first for seg in ci), (ci, first)


def test_relative_links_exist():
    links = re.findall(r"\]\(([^)\s]+)\)", README.read_text())
    local = [link.split("#")[0] for link in links if not re.match(r"[a-z]+://", link) and not link.startswith("#")]
    assert local and [link for link in local if not (ROOT / link).exists()] == []


@pytest.mark.parametrize(
    "broken",
    [
        "python -m bagel_jax.trian --config=configs/tiny_shapes.py --workdir=/tmp/x",  # no such module
        "python -m bagel_jax.train --config=configs/tiny_shape.py --workdir=/tmp/x",  # no such config
        "python -m bagel_jax.train --config=configs/tiny_shapes.py --config.train.lrr=1e-3 --workdir=/tmp/x",  # key
        "python -m bagel_jax.train --config=configs/tiny_shapes.py --config.model.remat=foo --workdir=/tmp/x",  # value
        "python -m bagel_jax.aot --config=configs/tiny.py --topolgy=v5e:2x2",  # flag
        "python -m bagel_jax.infer.cli --random_tiny --mode=t2i --promt=x",  # argparse flag
        "python launch/xm_launch.py --config=configs/tiny.py --sweep=configs/sweeps/none.py --workdir=/tmp/x",  # file
        "python -m bagel_jax.sweep --config=configs/tiny_shapes.py --sweep=configs/sweeps/lr.py:nope",  # sweep arg
        'pip install -e ".[test,gpu]"',  # extra
        "make train",  # unknown command
    ],
)
def test_the_checks_catch_broken_commands(broken):
    assert check_command(shlex.split(broken)), broken


RUN = [c for _, c in COMMANDS if any(m in c for m in RUN_MARKERS)]


def test_cheap_commands_run_as_written(tmp_path):
    """Starts every cheap command at once (they take seconds each) and checks each exits 0 and writes its --out."""
    assert len(RUN) >= 2, RUN
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), JAX_PLATFORMS="cpu"
    )
    env.pop("XLA_FLAGS", None)  # the test session's 8 simulated devices are not what a user has
    runs = []
    for i, argv in enumerate(RUN):
        (tmp_path / str(i)).mkdir()
        argv = [sys.executable if a == argv[0] else a.replace("/tmp/", f"{tmp_path}/{i}/") for a in argv]
        runs.append(
            (argv, subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        )
    for argv, proc in runs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{shlex.join(argv)}\n{stdout[-2000:]}\n{stderr[-3000:]}"
        for a in argv:  # files the command says it writes exist
            if a.startswith("--out="):
                assert Path(a[len("--out=") :]).stat().st_size > 0, a
