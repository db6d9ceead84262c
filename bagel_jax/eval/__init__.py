"""Evaluators on synthetic shapes: a deterministic shape detector and three GenEval-style scores.

* ``detector``  flat-coloured shapes → (shape, colour, grid cell), no learning;
* ``geneval``   shapes-GenEval: text-to-image, six GenEval categories, per-category and overall accuracy;
* ``vqa``       shapes-VQA: questions about shape images, exact-match accuracy;
* ``edit``      shapes-edit: instruction edits, edited attribute right and the rest preserved;
* ``runner``    evaluators from ``config.evals`` (big_vision style), during training or standalone
                (``python -m bagel_jax.eval.runner``; import it as ``bagel_jax.eval.runner``).
"""

from bagel_jax.eval.detector import Detection, detect, detect_objects
from bagel_jax.eval.edit import ShapesEdit
from bagel_jax.eval.geneval import ShapesGenEval
from bagel_jax.eval.vqa import ShapesVQA

__all__ = ["Detection", "detect", "detect_objects", "ShapesGenEval", "ShapesVQA", "ShapesEdit"]
