"""notebooks/tiny_reproduction.ipynb runs end to end at reduced size, and training beats the untrained model.

The notebook itself asserts that training beats the untrained model on each score: accuracy on shapes-GenEval and
shapes-VQA; on shapes-edit the distance to the ground truth in the cells an edit touches (at this reduced size hardly
any edit is all right yet, see the README). This test runs it in a fresh kernel (nbclient) with the reduced step
counts below and checks the scores it printed.
"""
import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "tiny_reproduction.ipynb")
CI_SIZE = {"BAGEL_NB_VAE_STEPS": "800", "BAGEL_NB_VIT_STEPS": "300", "BAGEL_NB_STEPS": "1000",
           "BAGEL_NB_EVAL_EXAMPLES": "8"}


def _outputs(nb) -> str:
    text = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            text.append(out.get("text", "") if out.get("output_type") == "stream" else "")
    return "".join(text)


@pytest.mark.slow
def test_notebook_runs_and_training_beats_untrained(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("BAGEL_REPO", REPO)
    monkeypatch.setenv("BAGEL_NB_WORKDIR", str(tmp_path / "work"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.delenv("BAGEL_CHECKPOINT", raising=False)
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # one CPU device, as a student's machine has
    for key, value in CI_SIZE.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": REPO}})
    try:
        client.execute()
    finally:
        nbformat.write(nb, str(tmp_path / "executed.ipynb"))  # kept for debugging a failure
    lines = [line for line in _outputs(nb).splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, "the notebook prints one RESULT line"
    result = json.loads(lines[0][len("RESULT "):])
    print(json.dumps(result, indent=1), file=sys.stderr)
    assert result["bagel_steps"] == int(CI_SIZE["BAGEL_NB_STEPS"])
    assert result["vit_steps"] == int(CI_SIZE["BAGEL_NB_VIT_STEPS"]) and result["vit_object_acc"] > 0.5
    for name in ("geneval/overall", "vqa/overall"):
        assert result["trained"][name] > result["untrained"][name], name
    assert result["trained"]["edit/edit_l1"] < result["untrained"]["edit/edit_l1"]  # a distance: lower is better
    assert 0.0 <= result["trained"]["edit/overall"] <= 1.0
