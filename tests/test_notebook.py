"""notebooks/tiny_reproduction.ipynb runs end to end at reduced size, and training beats the untrained model.

The notebook itself asserts that training beats the untrained model on each score by a margin: accuracy on
shapes-GenEval and shapes-VQA; on shapes-edit the distance to the ground truth in the cells an edit touches (at this
reduced size hardly any edit is all right yet, see the README). This test runs it in a fresh kernel (nbclient) with
the reduced step counts below and checks the scores it printed against margins taken from the measured CI-size
numbers. The future-frame section runs as a smoke: it trains a few steps, generates and scores two next
frames (the trained model only).
"""

import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "tiny_reproduction.ipynb")
CI_SIZE = {
    "BAGEL_NB_VAE_STEPS": "600",
    "BAGEL_NB_VIT_STEPS": "300",
    "BAGEL_NB_STEPS": "800",
    "BAGEL_NB_EVAL_EXAMPLES": "8",
    # the future-frame section is a smoke in CI (a few steps, two clips, no untrained baseline): the code path
    "BAGEL_NB_FF_STEPS": "5",
    "BAGEL_NB_FF_EXAMPLES": "2",
    "BAGEL_NB_FF_BASELINE": "0",
}


def _outputs(nb) -> str:
    text = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            text.append(out.get("text", "") if out.get("output_type") == "stream" else "")
    return "".join(text)


@pytest.mark.slow
def test_notebook_runs_and_training_beats_untrained(tmp_path, monkeypatch):
    import nbclient  # pinned test dependencies (setup.py "test"): missing is a broken install, not a skip
    import nbformat

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
    result = json.loads(lines[0][len("RESULT ") :])
    print(json.dumps(result, indent=1), file=sys.stderr)
    assert result["bagel_steps"] == int(CI_SIZE["BAGEL_NB_STEPS"])
    assert result["vit_steps"] == int(CI_SIZE["BAGEL_NB_VIT_STEPS"])
    # Margins: below the gaps measured at this size (docs/EXPERIMENTS.md, "at CI size"), so that they catch a model
    # that learns clearly less: VAE PSNR 29.8 dB (6.2 dB after 4 steps), ViT object accuracy 1.0 (0.0 untrained),
    # GenEval 0.208 vs 0.000 untrained, VQA 0.500 vs 0.000, edit_l1 0.141 vs 0.188 (a distance: lower is better).
    # The notebook asserts the same, with a smaller edit_l1 margin that also holds at full size.
    assert result["vae_psnr"] >= 20.0, result["vae_psnr"]
    assert result["vit_object_acc"] >= 0.5, result["vit_object_acc"]
    trained, untrained = result["trained"], result["untrained"]
    assert trained["geneval/overall"] >= untrained["geneval/overall"] + 0.15
    assert trained["vqa/overall"] >= untrained["vqa/overall"] + 0.30
    assert trained["edit/edit_l1"] <= untrained["edit/edit_l1"] - 0.03
    future = [line for line in _outputs(nb).splitlines() if line.startswith("FUTURE_FRAME ")]
    assert len(future) == 1, "the future-frame section prints one FUTURE_FRAME line"
    future = json.loads(future[0][len("FUTURE_FRAME ") :])
    assert future["steps"] == int(CI_SIZE["BAGEL_NB_FF_STEPS"])
    assert future["examples"] == int(CI_SIZE["BAGEL_NB_FF_EXAMPLES"])
    assert set(future["trained"]) == {"next_frame", "objects", "copy_baseline"}, future
    assert all(0.0 <= v <= 1.0 for v in future["trained"].values()), future
    assert future["untrained"] is None, future  # BAGEL_NB_FF_BASELINE=0
