"""The tokenizer of a run that starts from a release folder (``train.init_from``): the one the release ships.

``resolve_tokenizer`` (no writes; the CLI's preflight and ``train`` call it before anything is built):
* ``data.tokenizer`` empty: the run's own copy in the workdir if it has one (a resume: the release may be gone),
  else the release's ``tokenizer.json`` / ``tokenizer.model`` (a release without one: an error, unless the data is
  the synthetic shapes, which ship their own);
* ``data.tokenizer`` set: it must encode as the release's does (same vocabulary size, special-token ids and ids of
  a probe text), else one ``ConfigError`` naming ``data.tokenizer`` and both files.
``keep_tokenizer`` then copies the release's file into the workdir and points ``data.tokenizer`` at the copy, so
``config.json``, a resume, ``bagel_jax.convert.export`` and inference from the workdir all read the run's own copy.
"""

from __future__ import annotations

import os
import shutil

from bagel_jax.config import ConfigError, is_remote
from bagel_jax.convert.release_sharded import TOKENIZER_FILES, is_release, release_tokenizer

PROBE = "A photo of a red circle <|vision_start|><|vision_end|> 你好, 1024×1024!"


def run_copy(workdir: str) -> str | None:
    """The run's copy of its release's tokenizer in ``workdir``, or None."""
    return release_tokenizer(workdir) if workdir and os.path.isdir(workdir) else None


def resolve_tokenizer(config, workdir: str) -> str | None:
    """Sets ``data.tokenizer`` from the release (see the module docstring); returns the release's tokenizer file
    that ``keep_tokenizer`` should copy (None: nothing to copy). Raises ``ConfigError``."""
    d, init = config.data, config.train.init_from
    if not init or is_remote(init):
        return None
    release = is_release(init)
    shipped = release_tokenizer(init) if release else None
    if not d.tokenizer:
        own = run_copy(workdir)
        if own is not None and (release or not os.path.exists(init)):
            d.tokenizer = own
            return None
        if release and shipped is None and d.builder != "synthetic_shapes":  # that builder ships its own
            raise ConfigError(
                f"data.tokenizer: empty, and the release folder {init} holds no {' / '.join(TOKENIZER_FILES)} "
                f"(copy its tokenizer there or set data.tokenizer)"
            )
        if shipped is not None:
            d.tokenizer = shipped
            return shipped
        return None
    if shipped is None or not os.path.isfile(d.tokenizer):
        return None
    if os.path.abspath(d.tokenizer) == os.path.abspath(shipped):  # resolved already (the CLI's preflight)
        return shipped
    check_same(d.tokenizer, shipped)
    return None


def check_same(ours: str, theirs: str) -> None:
    """Raises ``ConfigError`` (naming ``data.tokenizer``) unless the two tokenizer files encode alike."""
    with open(ours, "rb") as a, open(theirs, "rb") as b:
        if a.read() == b.read():
            return
    from bagel_jax.data.tokenizer import load_tokenizer

    try:
        x, y = load_tokenizer(ours), load_tokenizer(theirs)
    except (OSError, ValueError, RuntimeError) as e:
        raise ConfigError(f"data.tokenizer: cannot compare {ours} with the release's {theirs} ({e})") from None
    for what, a, b in (
        ("ids", x.vocab_size, y.vocab_size),
        ("special-token ids", x.special_token_ids(), y.special_token_ids()),
        (f"ids for {PROBE[:24]!r}…", x.encode(PROBE), y.encode(PROBE)),
    ):
        if a != b:
            show = (lambda v: v) if what == "ids" else (lambda v: str(v)[:60])
            raise ConfigError(
                f"data.tokenizer: {ours} is not the release's tokenizer {theirs} ({what}: {show(a)} vs {show(b)}); "
                f"leave data.tokenizer empty to use the release's"
            )


def keep_tokenizer(config, workdir: str, shipped: str | None) -> None:
    """Copies ``shipped`` (the release's tokenizer file) into ``workdir`` and points ``data.tokenizer`` at the copy
    (atomic: every host may write the same bytes)."""
    if shipped is None or is_remote(workdir):
        return
    os.makedirs(workdir, exist_ok=True)
    dest = os.path.join(workdir, os.path.basename(shipped))
    tmp = f"{dest}.{os.getpid()}.tmp"
    shutil.copyfile(shipped, tmp)
    os.replace(tmp, dest)
    config.data.tokenizer = dest
