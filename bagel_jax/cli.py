"""How the command-line programs start and fail.

A user error (a bad config value, an unknown key, a missing file, a bad flag) is one line on stderr,
``error: <key or file>: <what is wrong>``, and exit status 2, before anything is initialised or compiled. Programs
raise ``ConfigError`` (bagel_jax.config), ``InputError`` or ``LaunchError`` (bagel_jax.launch_utils) and run their
body under ``user_errors()``; absl programs parse their flags with ``parse_flags``.

``quiet_platforms`` keeps jax from loading libtpu (which prints warnings and writes log files to /tmp/tpu_logs)
on a machine without TPU chips. Imports nothing heavy (no jax).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from typing import NoReturn

from bagel_jax.config import ConfigError, config_keys, has_key, unknown_key_message

USER_ERROR = 2  # exit status of a user error (as argparse's)


class InputError(ValueError):
    """A bad command-line input (a flag value, a file); the message is one line naming it."""


def one_line(message: object) -> str:
    """``message`` with its lines joined (a user error is one line, whatever a library put in its text)."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def fail(message: object) -> NoReturn:
    """Prints ``error: <message>`` as one line on stderr and exits with status 2."""
    sys.stdout.flush()
    sys.stderr.write(f"error: {one_line(message)}\n")
    sys.stderr.flush()
    sys.exit(USER_ERROR)


def _user_error_types() -> tuple[type[BaseException], ...]:
    from bagel_jax.launch_utils import LaunchError

    return ConfigError, InputError, LaunchError


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Runs the body; a ``ConfigError`` / ``InputError`` / ``LaunchError`` becomes ``fail(message)``."""
    try:
        yield
    except _user_error_types() as e:
        fail(e)


def import_callable(spec: str, flag: str):
    """``"package.module:function"`` → the function; an ``InputError`` naming ``flag`` when it cannot be had."""
    import importlib

    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise InputError(f"{flag}: expected 'package.module:function', got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module), attr, None)
    except ImportError as e:
        raise InputError(f"{flag}={spec}: cannot import {module} ({e})") from None
    if not callable(fn):
        raise InputError(f"{flag}: {module} has no function {attr!r}")
    return fn


def say_and_exit(message: str) -> NoReturn:
    """A run with nothing to do: one line on stdout, exit status 0."""
    print(one_line(message), flush=True)
    sys.exit(0)


# --- absl flags ----------------------------------------------------------------------------------------------------


def _override_keys(argv: Sequence[str], config_flag: str) -> list[tuple[str, str]]:
    """``[(flag text, dotted key)]`` of the ``--config.a.b=v`` overrides in ``argv``."""
    prefix = f"--{config_flag}."
    out = []
    for arg in argv[1:]:
        if arg == "--":
            break
        if arg.startswith(prefix):
            out.append((arg, arg[len(prefix) :].split("=", 1)[0]))
    return out


def _flag_value(argv: Sequence[str], name: str) -> str | None:
    """The value of ``--name=v`` / ``--name v`` in ``argv`` (the last one), or None."""
    value = None
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
        elif arg == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def _config_flag_error(argv: Sequence[str], config_flag: str, error: BaseException) -> str:
    """One line for a config flag that did not load or whose override failed: the file that does not load, the
    override key the config lacks (with the nearest valid key), or the override's own error."""
    from bagel_jax.launch_utils import LaunchError, load_config

    spec = _flag_value(argv, config_flag)
    if spec is None:
        return f"--{config_flag}: {one_line(error)}"
    try:
        config = load_config(spec)
    except LaunchError as e:
        return f"--{config_flag}: {e}"
    except Exception as e:  # noqa: BLE001  (the user's config file raised)
        return f"--{config_flag}={spec}: {type(e).__name__}: {one_line(e)}"
    known = config_keys(config)
    for _, key in _override_keys(argv, config_flag):
        if not has_key(config, key):
            if key in known or any(key.startswith(k + ".") for k in known):  # under a free-form section (evals)
                return (
                    f"{key}: not in {spec} (a command-line override changes a key the config has; add new "
                    f"entries in the config file)"
                )
            return unknown_key_message(key, known)
    cause = error.__cause__ or error.__context__
    text = one_line(error) if cause is None else f"{one_line(error)} ({type(cause).__name__}: {one_line(cause)})"
    return f"--{config_flag}={spec}: {text}"


def parse_flags(argv: Sequence[str], flag_values=None, config_flag: str = "config") -> list[str]:
    """absl flag parsing (an ``app.run`` ``flags_parser``) with one-line errors: an unknown flag, a bad value, a
    missing required flag, a config file that does not load, or ``--config.<key>=…`` for a key the config lacks
    (named with the nearest valid key) exit with status 2. Returns the remaining argv."""
    from absl import flags

    flag_values = flags.FLAGS if flag_values is None else flag_values
    argv = list(argv)
    # a config_flags flag (it has a file name), not a plain string flag of the same name
    has_config = config_flag in flag_values and hasattr(type(flag_values[config_flag]), "config_filename")
    try:
        rest = flag_values(argv)
    except flags.Error as e:
        fail(e)
    except BrokenPipeError:  # --help into a closed pipe
        raise
    except Exception as e:  # noqa: BLE001  (the config file or one of its overrides failed: name which)
        if not has_config:
            raise
        fail(_config_flag_error(argv, config_flag, e))
    if has_config:
        try:  # config_flags defers a file that failed to load to the first access of the config
            config = flag_values[config_flag].value
            if config is not None:
                config.get("name")
        except Exception as e:  # noqa: BLE001
            fail(_config_flag_error(argv, config_flag, e))
    return rest


# --- platforms -----------------------------------------------------------------------------------------------------

GOOGLE_PCI_VENDOR = "0x1ae0"
_NOT_ACCELERATORS = ("0x01", "0x02")  # PCI classes of Google's storage and network devices (gVNIC) on cloud VMs
GPU_DEVICE_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")  # NVIDIA, WSL2, AMD (ROCm)


def _read(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return ""


def tpu_may_be_present() -> bool:
    """True unless this machine surely has no TPU chip: any Google PCI device other than storage or network (what
    jax's own probe looks for, without its list of chip ids), or a /dev/accel* / /dev/vfio device node."""
    import glob

    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return True
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        if _read(vendor) == GOOGLE_PCI_VENDOR:
            if not _read(os.path.join(os.path.dirname(vendor), "class")).startswith(_NOT_ACCELERATORS):
                return True
    return False


def gpu_may_be_present() -> bool:
    return any(os.path.exists(p) for p in GPU_DEVICE_FILES)


NOISY_LIBRARIES = (
    "/orbax/",
    "/etils/",
    "/grain/",
    "/clu/",
    "/jax/",
    "/jaxlib/",
    "/flax/",
    "/tensorflow/",
    "/tensorflow_datasets/",
)


class _LibraryInfo:
    """A logging filter that lets a library's records through only from WARNING up (ours keep INFO)."""

    def filter(self, record) -> bool:
        return record.levelno >= 30 or not any(part in record.pathname for part in NOISY_LIBRARIES)


def quiet_libraries() -> None:
    """Orbax, grain, clu, jax and TensorFlow log at WARNING and above on the console; this project's own INFO lines
    (one progress line per ``train.log_every``) stay. Call once the absl handler is installed (inside ``app.run``)."""
    import logging

    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _LibraryInfo) for f in handler.filters):
            handler.addFilter(_LibraryInfo())


def quiet_platforms() -> None:
    """On a machine with neither TPU chips nor GPUs, and ``JAX_PLATFORMS`` unset: run on ``cpu`` without trying
    libtpu (whose start-up prints warnings and writes log files). Call before jax initialises its backends."""
    if "JAX_PLATFORMS" in os.environ or tpu_may_be_present() or gpu_may_be_present():
        return
    os.environ["JAX_PLATFORMS"] = "cpu"  # this process and its children (data workers)
    if "jax" in sys.modules:
        import jax

        jax.config.update("jax_platforms", "cpu")
