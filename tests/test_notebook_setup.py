"""The notebook's first code cell: on Colab it installs the project, in a checkout it does nothing.

Colab is simulated by its marker (the ``COLAB_RELEASE_TAG`` environment variable). The install runs for real: the
cell clones this repository (``BAGEL_JAX_SOURCE`` = a ``file://`` URL of it) and pip-installs the clone into a fresh
venv, which sees this interpreter's packages so that only the project itself is installed (no dependencies, and no
network: pip is told ``--no-index`` when setuptools is here to build with). A new interpreter in the venv then imports
``bagel_jax`` from the clone, outside any checkout.
"""

import importlib.util
import json
import os
import subprocess
import sys
import sysconfig

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "tiny_reproduction.ipynb")


def install_cell() -> str:
    with open(NOTEBOOK, encoding="utf-8") as f:
        cells = [c for c in json.load(f)["cells"] if c["cell_type"] == "code"]
    source = "".join(cells[0]["source"])
    assert "BAGEL_JAX_SOURCE" in source, "the notebook's first code cell is the install cell"
    return source


@pytest.fixture
def no_subprocess(monkeypatch):
    """Any subprocess (pip, git) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"the cell started a subprocess: {args[0] if args else kwargs}")

    monkeypatch.setattr(subprocess, "Popen", refuse)


def run_cell(monkeypatch, colab: bool) -> dict:
    """Runs the cell in this interpreter (with or without the Colab marker); returns its namespace."""
    for key in ("COLAB_RELEASE_TAG", "BAGEL_JAX_SOURCE", "BAGEL_JAX_ACCELERATOR"):
        monkeypatch.delenv(key, raising=False)
    if colab:
        monkeypatch.setenv("COLAB_RELEASE_TAG", "simulated")
    namespace = {}
    exec(compile(install_cell(), "install_cell", "exec"), namespace)
    return namespace


@pytest.mark.parametrize("colab", [False, True], ids=["checkout", "colab_installed"])
def test_cell_installs_nothing_where_bagel_jax_imports(monkeypatch, no_subprocess, capsys, colab):
    assert importlib.util.find_spec("bagel_jax") is not None  # this checkout
    namespace = run_cell(monkeypatch, colab)
    assert namespace["IN_COLAB"] is colab
    assert namespace["ACCELERATOR"] in ("tpu", "gpu", "cpu")
    assert "pip" not in capsys.readouterr().out


def test_cell_outside_colab_and_a_checkout_says_how_to_install(monkeypatch, no_subprocess):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bagel_jax" else real_find_spec(name, *a)
    )
    with pytest.raises(ImportError, match=r"pip install -e \."):
        run_cell(monkeypatch, colab=False)


@pytest.mark.parametrize("accelerator,jax_build", [("tpu", ["jax[tpu]"]), ("gpu", ["jax[cuda12]"]), ("cpu", [])])
def test_install_takes_the_jax_build_of_the_accelerator(monkeypatch, tmp_path, accelerator, jax_build):
    namespace = run_cell(monkeypatch, colab=False)
    calls = []
    monkeypatch.setattr(subprocess, "check_call", calls.append)
    namespace["install_bagel_jax"](str(tmp_path), str(tmp_path / "unused"), accelerator)  # a local directory: no clone
    assert calls == [[sys.executable, "-m", "pip", "install", "-q", "-e", str(tmp_path), *jax_build]]


def test_bad_source_and_accelerator_are_one_line_errors(monkeypatch, no_subprocess, tmp_path):
    namespace = run_cell(monkeypatch, colab=False)
    with pytest.raises(ValueError, match="set BAGEL_JAX_SOURCE"):
        namespace["install_bagel_jax"](namespace["BAGEL_JAX_SOURCE"], str(tmp_path / "clone"), "cpu")  # placeholder
    monkeypatch.setenv("BAGEL_JAX_ACCELERATOR", "npu")
    with pytest.raises(ValueError, match="BAGEL_JAX_ACCELERATOR: one of tpu, gpu, cpu, got 'npu'"):
        namespace["runtime_accelerator"]()


def fresh_venv(path) -> str:
    """A venv whose interpreter also sees this one's packages (as plain paths: their .pth files, an editable
    bagel_jax among them, are not run). Returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = os.path.join(path, "bin", "python")
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    with open(os.path.join(purelib, "outer_site_packages.pth"), "w") as f:
        f.write("\n".join(ours) + "\n")
    return python


def test_colab_install_cell_installs_the_project_into_a_fresh_venv(tmp_path):
    python = fresh_venv(tmp_path / "venv")
    clone = tmp_path / "clone"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "BAGEL_REPO") and not k.startswith("PIP_")}
    env.update(
        COLAB_RELEASE_TAG="simulated",
        BAGEL_JAX_SOURCE="file://" + REPO,
        BAGEL_REPO=str(clone),
        BAGEL_JAX_ACCELERATOR="cpu",
        PIP_NO_DEPS="1",
        PIP_IGNORE_INSTALLED="1",
        PIP_CONFIG_FILE=os.devnull,
        PIP_DISABLE_PIP_VERSION_CHECK="1",
    )
    if importlib.util.find_spec(
        "setuptools"
    ):  # build with it, offline (pip reads the value as build_isolation: 0 = off)
        env.update(PIP_NO_INDEX="1", PIP_NO_BUILD_ISOLATION="0")
    check = "import importlib.util; assert importlib.util.find_spec('bagel_jax') is None, 'bagel_jax is visible'"
    subprocess.run([python, "-c", check], check=True, cwd=tmp_path, env=env)  # so the cell has something to do

    then = "\nimport bagel_jax\nprint('imported', bagel_jax.__file__)"  # the next cells, in the same interpreter
    cell = subprocess.run([python, "-c", install_cell() + then], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert cell.returncode == 0, cell.stdout + cell.stderr
    assert f"-m pip install -q -e {clone}\n" in cell.stdout, cell.stdout
    assert f"imported {clone / 'bagel_jax' / '__init__.py'}" in cell.stdout, cell.stdout
    imported = subprocess.run(
        [python, "-c", "import bagel_jax, bagel_jax.config; print(bagel_jax.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == str(clone / "bagel_jax" / "__init__.py")
