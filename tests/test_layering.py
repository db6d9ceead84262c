"""The layering contract (pyproject.toml ``[tool.importlinter]``, DESIGN §2) holds, and the checker catches a
forbidden import; importing the data pipeline in a fresh interpreter does not import jax."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINT_IMPORTS = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or shutil.which("lint-imports")


def _lint(cwd):
    if LINT_IMPORTS is None:
        pytest.fail("lint-imports (import-linter) is not installed: pip install -e '.[test]'")
    env = {**os.environ, "PYTHONPATH": cwd}
    return subprocess.run([LINT_IMPORTS, "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_the_layering_contract_holds():
    proc = _lint(ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


@pytest.mark.parametrize(
    "file,line,contract",
    [
        ("eval/runner.py", "from bagel_jax.train import loop", "Layers"),  # eval ↛ train
        ("attention/reference.py", "from bagel_jax.model import layers", "Layers"),  # kernels ↛ anything above
        ("data/pack.py", "import jax.numpy", "numpy-only"),  # data ↛ jax
        ("data/sample.py", "from bagel_jax.attention import mask", "numpy-only"),  # data ↛ kernels
        ("model/mot.py", "from bagel_jax.data import pack", "never imports the data"),  # model ↛ data
        ("convert/hf.py", "from bagel_jax.infer import api", "Layers"),  # convert ↛ infer
    ],
    ids=["eval-train", "attention-model", "data-jax", "data-attention", "model-data", "convert-infer"],
)
def test_the_checker_catches_a_forbidden_import(tmp_path, file, line, contract):
    shutil.copytree(
        os.path.join(ROOT, "bagel_jax"), tmp_path / "bagel_jax", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), tmp_path / "pyproject.toml")
    target = tmp_path / "bagel_jax" / file
    target.write_text(target.read_text() + f"\n\ndef _forbidden():\n    {line}  # noqa\n")
    proc = _lint(str(tmp_path))
    assert proc.returncode != 0, proc.stdout[-2000:]
    broken = [ln for ln in proc.stdout.splitlines() if ln.endswith("BROKEN")]
    assert len(broken) == 1 and contract in broken[0], proc.stdout[-3000:]


def test_importing_the_data_pipeline_does_not_import_jax():
    code = (
        "import sys, bagel_jax.data.pipeline, bagel_jax.data.builders.synthetic_shapes, bagel_jax.batch; "
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax', 'optax')); "
        "assert not heavy, heavy"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
