"""Evaluators from a config, run during training or standalone (big_vision style).

``config.evals`` maps a name to one evaluator::

    config.evals.geneval = dict(type="shapes_geneval", num_examples=16, every=1000)   # 16 prompts per category
    config.evals.vqa = dict(type="shapes_vqa", num_examples=48, every=1000, seed=1)
    config.evals.edit = dict(type="shapes_edit", num_examples=32, every=0)             # 0: standalone only
    config.evals.future = dict(type="shapes_future_frame", num_examples=64, every=500)  # moving-shapes clips

``type`` picks the class in ``EVALUATORS``; ``every`` is the step period in training (0 = never); every other
key is passed to the class (unknown keys fail with the dotted key). Each evaluator consumes one callable,
named by its ``fn_name``: ``generate_fn(prompt, seed) -> image``, ``answer_fn(image, question) -> str`` or
``edit_fn(image, instruction, seed) -> image`` or ``future_fn(frames, frame_indexes, caption, seed) -> image``
(``seed``: the image's own sampling seed, so images are independent
draws); ``run_evals`` returns ``{f"{name}/{metric}": value}``.

Standalone::

    python -m bagel_jax.eval.runner --workdir=/tmp/run [--params=ema|params|untrained] [--only=geneval,vqa]
    python -m bagel_jax.eval.runner --config=configs/tiny.py --fns=my.module:make_fns [--output=/tmp/m.json]

``--workdir`` evaluates a training run (its config.json and latest checkpoint, or with ``--params=untrained``
its step-0 model: the baseline); see ``infer/from_workdir.py``. Its ``evals`` run, or those of ``--config``
when given. Its params are sharded as training shards them on the mesh of ``parallel`` (``--config``'s when it has
that section, e.g. ``--config.parallel.fsdp=8``, else the run's; ``infer/placement.py``), and the evaluators' calls
run on the KV-cached batched path (``--no_cache``: the cache-free oracle, one request at a time).

``--fns`` names ``factory(config, evaluators) -> {"generate_fn": ..., "answer_fn": ..., "edit_fn": ...}``
(only the ones the selected evaluators need). ``--fns=bagel_jax.eval.runner:ground_truth_fns`` answers from
the evaluators' own ground truth: a self-check of the scoring that must print 1.0 for every accuracy and 0.0
for shapes-edit's distances ``edit_l1`` and ``rest_l1`` (its ``*_unedited`` / ``*_blank`` are references). Without
``--config`` (or with an empty ``config.evals``) the evaluators of ``default_evals()`` run.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections
import numpy as np

from bagel_jax.cli import InputError, import_callable, one_line
from bagel_jax.config import ConfigError
from bagel_jax.eval import edit, future_frame, geneval, vqa

EVALUATORS = {
    "shapes_geneval": geneval.ShapesGenEval,
    "shapes_vqa": vqa.ShapesVQA,
    "shapes_edit": edit.ShapesEdit,
    "shapes_future_frame": future_frame.ShapesFutureFrame,
}
FN_NAMES = ("generate_fn", "answer_fn", "edit_fn", "future_fn")


def default_evals() -> ml_collections.ConfigDict:
    """The three shapes evaluators at a size that runs in about a minute with a tiny model on CPU."""
    return ml_collections.ConfigDict(
        dict(
            geneval=dict(type="shapes_geneval", num_examples=16, every=0),
            vqa=dict(type="shapes_vqa", num_examples=48, every=0),
            edit=dict(type="shapes_edit", num_examples=32, every=0),
        )
    )


@dataclasses.dataclass
class Scheduled:
    """An evaluator with its name and training period (``every`` steps; 0 = only standalone)."""

    name: str
    type: str
    evaluator: Any
    every: int

    def due(self, step: int) -> bool:
        return self.every > 0 and step > 0 and step % self.every == 0


def _parse(name: str, spec) -> tuple[str, int, dict]:
    """One ``config.evals`` entry → (type, every, constructor kwargs); raises ``ConfigError``."""
    if isinstance(spec, ml_collections.ConfigDict):
        spec = spec.to_dict()
    if not isinstance(spec, Mapping):
        raise ConfigError(f"evals.{name}: expected a dict with a 'type', got {type(spec).__name__}")
    kwargs = dict(spec)
    kind = kwargs.pop("type", None)
    if kind not in EVALUATORS:
        raise ConfigError(f"evals.{name}.type: expected one of {sorted(EVALUATORS)}, got {kind!r}")
    every = kwargs.pop("every", 0)
    if not isinstance(every, int) or isinstance(every, bool) or every < 0:
        raise ConfigError(f"evals.{name}.every: expected an int >= 0, got {every!r}")
    known = list(inspect.signature(EVALUATORS[kind]).parameters)
    for key in kwargs:
        if key not in known:
            raise ConfigError(f"evals.{name}.{key}: unknown option for {kind}; known: type, every, {', '.join(known)}")
    return kind, every, kwargs


def validate_evals(evals) -> None:
    """Checks every ``config.evals`` entry (type, every, option names) without drawing any examples."""
    for name, spec in evals.items():
        _parse(name, spec)


def build_evaluators(evals) -> dict[str, Scheduled]:
    """``config.evals`` → {name: Scheduled}; a bad entry raises ``ConfigError`` naming ``evals.<name>.<key>``."""
    out = {}
    for name, spec in evals.items():
        kind, every, kwargs = _parse(name, spec)
        try:
            evaluator = EVALUATORS[kind](**kwargs)
        except ValueError as e:  # the evaluators' messages start with the option name
            raise ConfigError(f"evals.{name}.{e}") from e
        out[name] = Scheduled(name, kind, evaluator, every)
    return out


def run_evals(
    evaluators: Mapping[str, Scheduled],
    *,
    step: int | None = None,
    generate_fn: Callable | None = None,
    answer_fn: Callable | None = None,
    edit_fn: Callable | None = None,
    future_fn: Callable | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Runs the evaluators due at ``step`` (all of them when ``step`` is None) → {"name/metric": value}.

    Also reports ``name/seconds``. An evaluator whose callable was not given raises ``ValueError``.
    """
    fns = {"generate_fn": generate_fn, "answer_fn": answer_fn, "edit_fn": edit_fn, "future_fn": future_fn}
    metrics = {}
    for name, sched in evaluators.items():
        if step is not None and not sched.due(step):
            continue
        fn = fns[sched.evaluator.fn_name]
        if fn is None:
            raise ValueError(f"evals.{name}: {sched.type} needs {sched.evaluator.fn_name}, none was given")
        start = time.perf_counter()
        result = sched.evaluator.run(fn)
        metrics.update({f"{name}/{k}": float(v) for k, v in result.items()})
        metrics[f"{name}/seconds"] = time.perf_counter() - start
        if log is not None:
            log(f"{name}: " + ", ".join(f"{k}={v:.3f}" for k, v in result.items()))
    return metrics


def _key(image, text: str) -> tuple:
    arr = np.ascontiguousarray(np.asarray(image))
    return arr.shape, arr.tobytes(), text


def ground_truth_fns(config, evaluators: Mapping[str, Scheduled]) -> dict[str, Callable]:
    """Callables that answer from the evaluators' own ground truth (renders of the expected scene, the
    reference answer); scoring them must give 1.0 for every accuracy and 0.0 for the edit distances.
    ``config`` is unused."""
    del config
    prompts, answers, edits, futures = {}, {}, {}, {}
    for sched in evaluators.values():
        ev = sched.evaluator
        for e in ev.examples:
            if isinstance(ev, geneval.ShapesGenEval):
                prompts.setdefault(e.prompt, e)
            elif isinstance(ev, vqa.ShapesVQA):
                answers[_key(e.render(), e.question)] = e.answer
            elif isinstance(ev, edit.ShapesEdit):
                edits[_key(e.render(), e.instruction)] = e
            elif isinstance(ev, future_frame.ShapesFutureFrame):
                futures[_key(e.render(future_frame.CONTEXT_FRAMES - 1), e.caption)] = e

    def generate_fn(prompt, seed):
        del seed
        return prompts[prompt].render()

    def answer_fn(image, question):
        return answers[_key(image, question)]

    def edit_fn(image, instruction, seed):
        del seed
        return edits[_key(image, instruction)].render("target")

    def future_fn(frames, frame_indexes, caption, seed):
        del frame_indexes, seed
        return futures[_key(frames[-1], caption)].render(future_frame.CONTEXT_FRAMES)

    return {"generate_fn": generate_fn, "answer_fn": answer_fn, "edit_fn": edit_fn, "future_fn": future_fn}


def load_factory(spec: str) -> Callable:
    """``"package.module:function"`` → the function; raises ``InputError`` naming ``--fns``."""
    return import_callable(spec, "--fns")


def check_run(workdir: str, params: str):
    """The run at ``workdir`` can be evaluated with ``--params``: its config.json, a checkpoint (unless
    ``untrained``), its tokenizer and, for ``untrained``, its VAE / ViT init paths. Returns the run's config;
    raises ``InputError`` / ``ConfigError`` naming the flag, the file or the key. Reads no weights."""
    from bagel_jax.config import check_paths, latest_checkpoint
    from bagel_jax.infer import from_workdir

    if not os.path.isdir(workdir):
        raise InputError(f"--workdir: {workdir} is not a directory")
    try:
        run = from_workdir.load_run_config(workdir)
    except FileNotFoundError as e:
        raise InputError(str(e)) from None
    except (ValueError, TypeError) as e:  # not JSON, or not a config
        raise InputError(f"--workdir: {os.path.join(workdir, 'config.json')}: unreadable ({one_line(e)})") from None
    if params != "untrained" and latest_checkpoint(workdir) is None:
        raise InputError(
            f"--workdir: {workdir} has no checkpoint (checkpoints/<step>) to take --params={params} "
            f"from; --params=untrained evaluates the step-0 model"
        )
    check_paths(run, None, "eval" if params != "untrained" else "eval_untrained")
    return run


def main(argv=None) -> dict[str, float]:
    """The standalone runner; a bad flag exits 2 with one line, other user errors raise ``InputError`` /
    ``ConfigError`` (one line each when run as a program)."""
    from absl import flags
    from ml_collections import config_flags

    from bagel_jax.cli import parse_flags, quiet_platforms
    from bagel_jax.config import check_writable_dir
    from bagel_jax.huge_pages import reexec_with_huge_pages

    reexec_with_huge_pages()  # on CPU: XLA's large buffers on huge pages (re-executes once, before jax)
    quiet_platforms()
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "Config file (get_config); its `evals` are run.", flag_values=flag_values, lock_config=False
    )
    flags.DEFINE_string("fns", None, "package.module:factory returning the callables.", flag_values=flag_values)
    flags.DEFINE_string("workdir", None, "A training run to evaluate (instead of --fns).", flag_values=flag_values)
    flags.DEFINE_enum(
        "params", "ema", ["ema", "params", "untrained"], "With --workdir: which weights.", flag_values=flag_values
    )
    flags.DEFINE_list("only", [], "Run only these evals (names in config.evals).", flag_values=flag_values)
    flags.DEFINE_string("output", "", "Write the metrics here as JSON.", flag_values=flag_values)
    flags.DEFINE_bool(
        "no_cache", False, "With --workdir: the cache-free oracle instead of the KV cache.", flag_values=flag_values
    )
    argv = sys.argv if argv is None else argv
    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        print(__doc__ + "\n" + flag_values.get_help())
        sys.exit(0)
    rest = parse_flags(argv, flag_values)
    if len(rest) > 1:
        raise InputError(f"unexpected arguments {rest[1:]}")
    config = flag_values.config
    if bool(flag_values.fns) == bool(flag_values.workdir):
        raise InputError("--fns / --workdir: give exactly one")
    if flag_values.output:
        check_writable_dir(os.path.dirname(os.path.abspath(flag_values.output)), "--output")
    run = None
    if flag_values.workdir:
        from bagel_jax.eval.inferencer_fns import inferencer_fns
        from bagel_jax.infer import from_workdir

        run = check_run(flag_values.workdir, flag_values.params)
        config = config if config is not None else run
    evals = config.get("evals") if config is not None else None
    evaluators = build_evaluators(evals if evals else default_evals())
    unknown = [n for n in flag_values.only if n not in evaluators]
    if unknown:
        raise InputError(f"--only: unknown evals {unknown}; known {sorted(evaluators)}")
    if flag_values.only:
        evaluators = {n: evaluators[n] for n in flag_values.only}
    if run is not None:
        from bagel_jax.infer.placement import placement_from_config

        placement = placement_from_config(config if "parallel" in config else run)  # before any weights load
        inf = from_workdir.run_inferencer(
            flag_values.workdir, flag_values.params, run, placement=placement, cached=not flag_values.no_cache
        )
        fns = inferencer_fns(inf)
    else:
        fns = dict(load_factory(flag_values.fns)(config, evaluators))
    bad = [k for k in fns if k not in FN_NAMES]
    if bad:
        raise ValueError(f"--fns: the factory returned unknown callables {bad}; expected some of {FN_NAMES}")
    metrics = run_evals(evaluators, log=print, **fns)
    if flag_values.output:
        with open(flag_values.output, "w") as f:
            json.dump(metrics, f, indent=1, sort_keys=True)
    print(json.dumps(metrics, sort_keys=True))
    return metrics


if __name__ == "__main__":
    from bagel_jax.cli import user_errors

    with user_errors():
        main()
