r"""XManager launcher: one job per sweep point, each running the trainer with that point's overrides.

Dry run (no credentials, no network, no Docker): prints every job's spec and its command line::

    python launch/xm_launch.py --config=configs/bagel_7b_mot.py --sweep=configs/sweeps/lr.py \
        --tpu=v5p:4x4x4 --workdir=gs://BUCKET/sweeps/lr --dry_run

Launch for real by dropping ``--dry_run``; ``--xm_backend`` picks where:

* ``local``: this machine, one process per point (``python -m bagel_jax.train …``), for tiny CPU configs.
* ``vertex``: Vertex AI custom jobs from a container built from this checkout (needs gcloud credentials
  and Docker or Cloud Build). The open-source ``xmanager`` (0.8.x) maps only TPU v2/v3 onto Vertex AI;
  for v4/v5e/v5p/v6e use ``launch/gcloud/`` or reuse ``build_jobs`` with an executor of your XManager
  deployment that places that TPU.

Every point is checked against the config schema (``bagel_jax.config.validate``) before anything launches.
Run it from the repository root: config and sweep paths are relative to it, as they are in the jobs.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from absl import app, flags

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

from bagel_jax import launch_utils as lu  # noqa: E402

_TPU_GENERATIONS = {
    "v2": "TPU_V2",
    "v3": "TPU_V3",
    "v4": "TPU_V4",
    "v5e": "TPU_V5E",
    "v5litepod": "TPU_V5E",
    "v5p": "TPU_V5P",
    "v6e": "TPU_V6E",
    "v7x": "TPU_V7X",
    "7x": "TPU_V7X",
}
_VERTEX_TPUS = ("TPU_V2", "TPU_V3")  # what xmanager.cloud.vertex can place
BACKENDS = ("local", "vertex")


# --- job construction (backend independent) ----------------------------------------------------------


def tpu_requirements(tpu: str):
    """``"v5p:2x2x2"`` → ``xm.JobRequirements(tpu_v5p=xm.Topology('2x2x2'))``."""
    from xmanager import xm

    generation, sep, topology = tpu.partition(":")
    if not sep or generation.lower() not in _TPU_GENERATIONS:
        raise lu.LaunchError(
            f"--tpu={tpu!r}: expected GENERATION:TOPOLOGY with GENERATION in {sorted(_TPU_GENERATIONS)}, e.g. v5p:2x2x2"
        )
    resource = xm.ResourceType[_TPU_GENERATIONS[generation.lower()]]
    try:
        shape = xm.Topology(topology)
    except xm.InvalidTpuTopologyError as e:
        raise lu.LaunchError(f"--tpu={tpu!r}: bad topology {topology!r}") from e
    try:
        return xm.JobRequirements({resource: shape})
    except AttributeError:
        # xmanager 0.8.0-0.8.2 call ResourceType.architecture(), which they lack, for every accelerator
        # (fixed in 0.8.3, which needs protobuf<7 and so cannot sit beside our protobuf pin). Set the
        # same three fields that the fixed constructor sets.
        requirements = xm.JobRequirements()
        requirements.accelerator = resource
        requirements.topology = shape
        requirements.task_requirements[resource] = shape.chip_count
        return requirements


@dataclass
class SweepJob:
    """One sweep point: its overrides, its workdir and the xm.Job that runs it."""

    index: int
    overrides: dict[str, Any]
    workdir: str
    job: Any  # xm.Job

    @property
    def argv(self) -> list[str]:
        """The trainer's flags exactly as the job passes them (unquoted)."""
        return self.job.args.to_list(str)

    def command_line(self) -> str:
        """The shell line the backend runs (xmanager quotes each argument with shlex)."""
        from xmanager import xm
        from xmanager.xm import utils

        executable = self.job.executable
        program = getattr(executable, "command", None) or "python"
        args = xm.merge_args(executable.args, self.job.args).to_list(utils.ARG_ESCAPER)
        return " ".join([program, *args])

    def spec(self) -> dict[str, Any]:
        executor = self.job.executor
        requirements = getattr(executor, "requirements", None)
        return {
            "name": self.job.name,
            "overrides": self.overrides,
            "workdir": self.workdir,
            "executor": type(executor).__name__,
            "requirements": repr(requirements),
            "accelerator": str(requirements.accelerator) if requirements and requirements.accelerator else None,
            "topology": requirements.topology.name if requirements and requirements.topology else None,
            "chips": int(requirements.topology.chip_count) if requirements and requirements.topology else 0,
            "executable": type(self.job.executable).__name__,
            "image": getattr(self.job.executable, "image_path", None),
            "env": dict(self.job.env_vars),
            "argv": self.argv,
            "command": self.command_line(),
        }


def build_jobs(
    config_spec: str,
    points: Sequence[Mapping[str, Any]],
    workdir: str,
    executable,
    executor_factory: Callable[[], Any],
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> list[SweepJob]:
    """One ``xm.Job`` per point: trainer flags ``--config``, the point's overrides, ``extra_args``,
    ``--workdir=<workdir>/<point name>``."""
    from xmanager import xm

    jobs = []
    for i, point in enumerate(points):
        point_dir = lu.point_workdir(workdir, i, point)
        args = lu.trainer_args(config_spec, point_dir, point, extra_args)
        name = lu.point_name(i, point)
        job = xm.Job(executable=executable, executor=executor_factory(), name=name, args=args, env_vars=dict(env or {}))
        jobs.append(SweepJob(index=i, overrides=dict(point), workdir=point_dir, job=job))
    return jobs


# --- backends -----------------------------------------------------------------------------------------


def _docker_instructions() -> list[str]:
    return [
        "COPY . /bagel_jax",
        "WORKDIR /bagel_jax",
        "RUN pip install --no-cache-dir -U pip && pip install --no-cache-dir -e '.[tpu]'",
    ]


def backend_parts(backend: str, tpu: str | None, image_tag: str | None):
    """(packageable, dry-run executable, executor factory) for ``backend``; nothing here opens a socket."""
    from xmanager import xm, xm_local
    from xmanager.xm_local import executables as local_executables

    if backend == "local":
        if tpu:
            raise lu.LaunchError(f"--tpu={tpu!r}: the local backend runs on this machine's devices; drop --tpu")
        packageable = xm.binary(executor_spec=xm_local.Local.Spec(), path=sys.executable, args=["-m", lu.TRAIN_MODULE])
        executable = local_executables.LocalBinary(
            name="bagel_jax", command=sys.executable, args=xm.SequentialArgs.from_collection(["-m", lu.TRAIN_MODULE])
        )
        return packageable, executable, xm_local.Local
    if backend == "vertex":
        if not tpu:
            raise lu.LaunchError("--tpu is required for the vertex backend (e.g. --tpu=v3:2x2)")
        requirements = tpu_requirements(tpu)
        packageable = xm.python_container(
            executor_spec=xm_local.Vertex.Spec(push_image_tag=image_tag),
            path=str(REPO),
            base_image="python:3.11-slim",
            entrypoint=xm.ModuleName(lu.TRAIN_MODULE),
            docker_instructions=_docker_instructions(),
        )
        executable = local_executables.GoogleContainerRegistryImage(
            name="bagel_jax",
            image_path=image_tag or "<image built from this checkout>",
            args=xm.SequentialArgs.from_collection(["-m", lu.TRAIN_MODULE]),
        )
        return packageable, executable, lambda: xm_local.Vertex(requirements=requirements)
    raise lu.LaunchError(f"--xm_backend={backend!r}: expected one of {BACKENDS}")


def check_placeable(backend: str, jobs: Sequence[SweepJob]):
    """Raises ``LaunchError`` if ``backend`` cannot place the jobs' accelerator."""
    for job in jobs:
        requirements = getattr(job.job.executor, "requirements", None)
        accelerator = requirements.accelerator if requirements is not None else None
        if backend == "vertex" and accelerator is not None and str(accelerator) not in _VERTEX_TPUS:
            raise lu.LaunchError(
                f"--tpu: xmanager's Vertex AI backend places only TPU v2/v3, not {accelerator}; "
                "use launch/gcloud/ for this TPU"
            )


def dry_run_report(jobs: Sequence[SweepJob], backend: str) -> str:
    """Human- and machine-readable: one JSON object per job, then a placement note if any."""
    lines = [json.dumps(job.spec(), sort_keys=True) for job in jobs]
    try:
        check_placeable(backend, jobs)
    except lu.LaunchError as e:
        lines.append(f"note: a real launch would stop here: {e}")
    return "\n".join(lines)


def launch(packageable, jobs: Sequence[SweepJob], title: str):
    """Packages once and adds one work unit per job (real launch; needs the backend's credentials)."""
    from xmanager import xm_local

    with xm_local.create_experiment(experiment_title=title) as experiment:
        [executable] = experiment.package([packageable])
        for job in jobs:
            job.job.executable = executable
            experiment.add(job.job)


# --- command line -------------------------------------------------------------------------------------


def define_flags():
    """The command-line flags; defined only when run as a program, so importing stays side-effect free."""
    flags.DEFINE_string("config", None, "Trainer config file, path[:arg], relative to the repository.")
    flags.DEFINE_string("sweep", None, "Sweep file path[:arg] defining get_sweep(arg) -> list of override dicts.")
    flags.DEFINE_string("workdir", None, "Base workdir (local path or gs://); each point gets <workdir>/<point name>.")
    flags.DEFINE_string("tpu", None, "TPU generation:topology for every job, e.g. v5p:4x4x4 or v3:2x2.")
    flags.DEFINE_enum("xm_backend", "vertex", BACKENDS, "Where the jobs run.")
    flags.DEFINE_string("image_tag", None, "vertex: registry tag to push the image to (REGISTRY/NAME:TAG).")
    flags.DEFINE_multi_string("trainer_arg", [], "Extra trainer flag for every job, verbatim (repeatable).")
    flags.DEFINE_multi_string("env", [], "KEY=VALUE environment variable for every job (repeatable).")
    flags.DEFINE_string("experiment_title", "bagel_jax", "XManager experiment title.")
    flags.DEFINE_bool("dry_run", False, "Print the job specs and command lines; create, package and launch nothing.")


def main(argv):
    """A bad flag, config, sweep file or point is one line on stderr and exit status 2, before anything launches."""
    from bagel_jax.cli import fail, user_errors

    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}")
    FLAGS = flags.FLAGS
    for name in ("config", "workdir"):
        if not FLAGS[name].value:
            fail(f"--{name} is required")
    env = {}
    for item in FLAGS.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"--env={item!r}: expected KEY=VALUE")
        env[key] = value
    with user_errors():
        points = lu.load_points(FLAGS.config, FLAGS.sweep)
        packageable, executable, executor_factory = backend_parts(FLAGS.xm_backend, FLAGS.tpu, FLAGS.image_tag)
        jobs = build_jobs(FLAGS.config, points, FLAGS.workdir, executable, executor_factory, FLAGS.trainer_arg, env)
        if FLAGS.dry_run:
            print(dry_run_report(jobs, FLAGS.xm_backend))
            return
        check_placeable(FLAGS.xm_backend, jobs)
    launch(packageable, jobs, FLAGS.experiment_title)


if __name__ == "__main__":
    from bagel_jax.cli import parse_flags

    define_flags()
    app.run(main, flags_parser=parse_flags)
