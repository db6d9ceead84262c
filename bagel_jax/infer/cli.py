"""Command-line inference (KV-cached path; ``--no_cache`` runs the cache-free oracle instead).

    python -m bagel_jax.infer.cli --checkpoint=/path/BAGEL-7B-MoT --mode=t2i --prompt="a red fox" --out=fox.png
    python -m bagel_jax.infer.cli --checkpoint=DIR --mode=understand --image=cat.jpg --prompt="What is this?"
    python -m bagel_jax.infer.cli --checkpoint=DIR --mode=edit --image=cat.jpg --prompt="make it blue" --out=x.png
    python -m bagel_jax.infer.cli --random_tiny --mode=t2i --prompt="a red square" --out=/tmp/x.png   # smoke run
    python -m bagel_jax.infer.cli --checkpoint=DIR --mode=t2i --think --prompt="a fox" --out=fox.png  # plan first
    python -m bagel_jax.infer.cli --checkpoint=DIR --mode=interleave --prompt="a story in pictures" --out=story/

``--think`` (every mode): the model first writes its plan / reasoning after the reference's think system prompt,
printed as ``thinking: ...``; then the image or the answer. ``--mode=interleave``: text and images alternate until
the model ends (``<|im_end|>``), ``--max_images`` or the cache limit; each output is printed (texts) or written
(images) into the directory ``--out`` as NN.txt / NN.png in order (``infer/interleave.py``).

Params are placed sharded on a mesh built from ``config.parallel`` (``--config.parallel.fsdp=8`` etc.; the same
logical-axis rules as training; default: data parallel over all devices), read tensor slice by tensor slice
straight onto their shards. ``--dtype`` sets compute and param dtypes end to end, the VAE included.
Any ``--config.KEY=VALUE`` overrides a key of the config.

``--checkpoint`` is a release-layout directory (``ema.safetensors``, ``ae.safetensors``, ``llm_config.json``,
``vit_config.json``, tokenizer files). ``--random_tiny`` first writes a random checkpoint at configs/tiny.py
shapes plus a small SentencePiece tokenizer into ``--checkpoint`` (default: one cached directory per model shape
under ``$XDG_CACHE_HOME/bagel_jax``, written once and reused).

A bad argument, a missing or unreadable file (image, checkpoint, tokenizer, config) or an unwritable ``--out`` is one
line on stderr and exit status 2, before any weights load or anything compiles.
Defaults per mode follow the reference's notebook/app (bagel.md §8.4): t2i cfg_text 4, cfg_img 1, interval
[0.4, 1], global renorm; edit cfg_text 4, cfg_img 2, interval [0, 1], text_channel renorm; 50 steps, shift 3;
understanding greedy, max 512 tokens. Inputs beyond the model's limits (a prompt longer than
``--max_context_tokens``, an output size beyond the latent position table) fail with one line naming the limit.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

MODES = ("understand", "t2i", "edit", "interleave")
MODE_DEFAULTS = {
    "t2i": dict(cfg_text_scale=4.0, cfg_img_scale=1.0, cfg_interval="0.4,1.0", cfg_renorm_type="global"),
    "edit": dict(cfg_text_scale=4.0, cfg_img_scale=2.0, cfg_interval="0.0,1.0", cfg_renorm_type="text_channel"),
}
LLM_CONFIG = "llm_config.json"  # what marks a release-layout directory (convert/bagel_ckpt.py LLM_CONFIG)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's own status), no usage block
        from bagel_jax.cli import fail

        fail(f"{message} (see --help)")


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(prog="python -m bagel_jax.infer.cli", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="", help="release-layout directory")
    p.add_argument("--mode", choices=MODES, required=True)
    p.add_argument("--prompt", default="", help="the text input")
    p.add_argument("--image", default="", help="input image (understand / edit)")
    p.add_argument(
        "--out", default="", help="output PNG (t2i / edit), text file (understand) or directory (interleave)"
    )
    p.add_argument("--tokenizer", default="", help="tokenizer.json / *.model (default: in --checkpoint)")
    p.add_argument(
        "--config",
        default="",
        help="Python config file (path.py[:arg]) for non-checkpoint "
        "settings (dtype, attention impl, resize rules); default: bagel_jax.config.base_config()",
    )
    p.add_argument("--random_tiny", action="store_true", help="write and use a random tiny checkpoint")
    p.add_argument(
        "--dtype",
        default="",
        choices=("", "float32", "bfloat16"),
        help="compute and param dtype of the whole model, VAE included (default: the config's)",
    )
    p.add_argument("--height", type=int, default=0, help="t2i image height (default: data.vae_transform max)")
    p.add_argument("--width", type=int, default=0)
    p.add_argument("--num_timesteps", type=int, default=50)
    p.add_argument("--timestep_shift", type=float, default=3.0)
    p.add_argument("--cfg_text_scale", type=float, default=None)
    p.add_argument("--cfg_img_scale", type=float, default=None)
    p.add_argument("--cfg_interval", default=None, help="'lo,hi': CFG applies when lo < t <= hi")
    p.add_argument("--cfg_renorm_type", default=None, choices=("global", "channel", "text_channel"))
    p.add_argument("--cfg_renorm_min", type=float, default=0.0)
    p.add_argument("--max_length", type=int, default=512, help="understanding / each interleaved text: max fed tokens")
    p.add_argument("--do_sample", action="store_true")
    p.add_argument("--temperature", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--think", action="store_true", help="think first (the reference's think system prompt)")
    p.add_argument("--max_think_tokens", type=int, default=1000, help="--think: max fed tokens of the thinking")
    p.add_argument("--max_images", type=int, default=4, help="interleave: at most this many generated images")
    p.add_argument(
        "--no_cache",
        action="store_true",
        help="cache-free oracle path (recomputes the context every step; slow, for checking the cached path)",
    )
    p.add_argument("--max_context_tokens", type=int, default=16384, help="KV cache limit: context + generated tokens")
    args, rest = p.parse_known_args(argv)
    args.overrides = {}
    for item in rest:
        key, eq, value = item.partition("=")
        if not key.startswith("--config.") or not eq:
            p.error(f"unrecognized arguments: {item}")
        args.overrides[key[len("--config.") :]] = _literal(value)
    if not args.checkpoint and not args.random_tiny:
        p.error("--checkpoint is required (or --random_tiny)")
    if args.mode in ("understand", "edit") and not args.image:
        p.error(f"--mode={args.mode} needs --image")
    if args.mode != "understand" and not args.out:
        p.error(f"--mode={args.mode} needs --out ({'a directory' if args.mode == 'interleave' else 'a PNG path'})")
    if not args.image and not args.prompt:
        p.error("--prompt and/or --image: nothing to condition on")
    image_mode = "edit" if args.mode == "edit" or (args.mode == "interleave" and args.image) else "t2i"
    for k, v in MODE_DEFAULTS[image_mode].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for name in ("height", "width", "num_timesteps", "max_length", "max_think_tokens", "max_images"):
        least = 0 if name in ("height", "width", "max_images") else 1
        if getattr(args, name) < least:
            p.error(f"--{name}: must be >= {least}, got {getattr(args, name)}")
    if args.cfg_interval is not None:
        try:
            lo, hi = (float(v) for v in args.cfg_interval.split(","))
        except ValueError:
            p.error(f"--cfg_interval: expected 'lo,hi' (two numbers), got {args.cfg_interval!r}")
        args.cfg_interval = (lo, hi)
    return args


def _literal(text: str):
    """A ``--config.KEY=VALUE`` value: a Python literal (number, bool, tuple, ...) or else the string."""
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def load_config_file(path: str):
    """``get_config()`` of a Python config file; raises ``InputError`` naming ``--config``."""
    from bagel_jax.cli import InputError
    from bagel_jax.launch_utils import LaunchError, load_config

    try:
        return load_config(path)
    except LaunchError as e:
        raise InputError(f"--config: {e}") from None
    except Exception as e:  # noqa: BLE001  (the user's config file raised)
        raise InputError(f"--config={path}: {type(e).__name__}: {e}") from None


def write_random_tiny(directory: str, config) -> None:
    """A random release-layout checkpoint at ``config.model`` shapes + a SentencePiece tokenizer."""
    from bagel_jax.convert.bagel_ckpt import write_random_checkpoint
    from bagel_jax.data.builders import synthetic_shapes
    from bagel_jax.data.tokenizer import train_sentencepiece

    write_random_checkpoint(directory, config.model, seed=0)
    tok = train_sentencepiece(
        synthetic_shapes.corpus(), os.path.join(directory, "tokenizer.model"), vocab_size=config.model.vocab_size
    )
    if tok.vocab_size > config.model.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} ids > model.vocab_size {config.model.vocab_size}")


def random_tiny_dir(config) -> str:
    """The cached random checkpoint for ``config.model`` (written on first use, atomically; reused after)."""
    import hashlib
    import shutil

    key = hashlib.sha256(config.model.to_json(sort_keys=True).encode()).hexdigest()[:12]
    cache = os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "bagel_jax"
    )
    directory = os.path.join(cache, f"random_tiny_{key}")
    if os.path.isfile(os.path.join(directory, "tokenizer.model")):  # the last file written
        return directory
    os.makedirs(cache, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".random_tiny_", dir=cache)
    try:
        write_random_tiny(tmp, config)
        os.replace(tmp, directory)  # another process may have won the race: its copy is the same
    except OSError:
        if not os.path.isfile(os.path.join(directory, "tokenizer.model")):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def find_tokenizer(checkpoint: str, tokenizer: str = "") -> str:
    """``tokenizer`` if given, else the checkpoint directory's tokenizer.json / tokenizer.model."""
    from bagel_jax.cli import InputError

    if tokenizer:
        if not os.path.isfile(tokenizer):
            raise InputError(f"--tokenizer: {tokenizer}: no such file")
        return tokenizer
    for name in ("tokenizer.json", "tokenizer.model"):
        path = os.path.join(checkpoint, name)
        if os.path.exists(path):
            return path
    raise InputError(f"--tokenizer: no tokenizer.json or tokenizer.model in {checkpoint} (pass --tokenizer)")


def check_checkpoint_dir(path: str) -> None:
    """``path`` looks like a release-layout directory; raises ``InputError`` naming ``--checkpoint`` otherwise (a
    training workdir is told apart and pointed to the tools that read one)."""
    from bagel_jax.cli import InputError

    if not os.path.exists(path):
        raise InputError(f"--checkpoint: {path} does not exist")
    if not os.path.isdir(path):
        raise InputError(
            f"--checkpoint: {path} is not a directory (a release layout: {LLM_CONFIG}, "
            f"ema.safetensors, ae.safetensors, vit_config.json, tokenizer)"
        )
    if os.path.isfile(os.path.join(path, LLM_CONFIG)):
        return
    if os.path.isdir(os.path.join(path, "checkpoints")) or os.path.isfile(os.path.join(path, "config.json")):
        raise InputError(
            f"--checkpoint: {path} is a training workdir (checkpoints/, config.json), not a release "
            f"layout ({LLM_CONFIG}, ema.safetensors, ...); evaluate it with python -m "
            f"bagel_jax.eval.runner --workdir={path}"
        )
    raise InputError(
        f"--checkpoint: no {LLM_CONFIG} in {path} (a release layout: {LLM_CONFIG}, ema.safetensors, "
        f"ae.safetensors, vit_config.json, tokenizer)"
    )


def read_image(path: str, max_input_pixels: int | None = None) -> np.ndarray:
    """The RGB pixels of ``path``; raises ``InputError`` naming ``--image`` for a missing or undecodable file."""
    from bagel_jax.cli import InputError
    from bagel_jax.data import images as img_lib

    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as e:
        raise InputError(f"--image: {path}: {e.strerror or e}") from None
    try:
        img = img_lib.decode_image(data, f"--image: {path}", max_input_pixels or img_lib.DEFAULT_MAX_INPUT_PIXELS)
    except img_lib.ImageError as e:
        raise InputError(str(e)) from None
    return np.asarray(img, np.uint8)


def preflight(args):
    """Everything checkable before jax: the config, the image, the checkpoint directory, the tokenizer file and the
    output path. Returns ``(config, image or None)``; raises ``InputError`` / ``ConfigError``."""
    from bagel_jax.config import base_config, check_writable_dir, validate

    config_path = args.config or (os.path.join(REPO_ROOT, "configs", "tiny.py") if args.random_tiny else "")
    config = load_config_file(config_path) if config_path else base_config()
    if getattr(args, "overrides", None):
        from bagel_jax.cli import InputError
        from bagel_jax.launch_utils import LaunchError, apply_overrides

        try:
            config = apply_overrides(config, args.overrides)
        except LaunchError as e:
            raise InputError(f"--config.{str(e).removeprefix('override: ')}") from None
    if args.dtype:  # end to end: compute and params, the VAE included
        config.model.dtype = config.model.param_dtype = config.model.vae.dtype = args.dtype
    validate(config)
    image = read_image(args.image, config.data.max_input_pixels) if args.image else None
    if not args.random_tiny:
        check_checkpoint_dir(args.checkpoint)
        find_tokenizer(args.checkpoint, args.tokenizer)
    else:
        if args.checkpoint:  # the random checkpoint is written there
            check_writable_dir(args.checkpoint, "--checkpoint")
        if args.tokenizer:
            find_tokenizer("", args.tokenizer)
    if args.out:
        check_writable_dir(os.path.dirname(os.path.abspath(args.out)), "--out")
    return config, image


def load_sharded(checkpoint: str, config):
    """``(model, params, placement)``: the release at ``checkpoint`` (its model config over ``config.model``), every
    param read slice by slice onto its shards of the mesh of ``config.parallel``, in ``model.param_dtype``."""
    import jax
    import numpy as np

    from bagel_jax.convert.bagel_ckpt import config_from_checkpoint
    from bagel_jax.convert.release_sharded import check_release, load_release_sharded
    from bagel_jax.infer.placement import placement_from_config
    from bagel_jax.model.bagel import make_init_fn
    from bagel_jax.parallel.mesh import logical_shardings

    config = config.copy_and_resolve_references()
    config.model = config_from_checkpoint(checkpoint, config.model)
    check_release(checkpoint, config.model)
    placement = placement_from_config(config)
    model, init_fn = make_init_fn(config)
    abstract = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
    shardings = logical_shardings(abstract, placement.mesh, placement.rules)
    dtype = np.dtype(config.model.param_dtype)
    like = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype), _unbox(abstract))
    return model, load_release_sharded(checkpoint, config.model, shardings, like), placement


def _unbox(tree):
    from flax.core import meta

    return meta.unbox(tree)


def main(argv=None) -> int:
    from bagel_jax.cli import user_errors
    from bagel_jax.huge_pages import reexec_with_huge_pages

    reexec_with_huge_pages()  # on CPU: XLA's large buffers on huge pages (re-executes once, before jax)
    args = parse_args(argv)
    with user_errors():
        return run(args)


def run(args) -> int:
    from bagel_jax.cli import InputError, quiet_platforms

    config, image = preflight(args)
    quiet_platforms()
    import jax

    from bagel_jax.convert.bagel_ckpt import CheckpointError
    from bagel_jax.data.tokenizer import load_tokenizer
    from bagel_jax.infer.api import Inferencer

    if args.random_tiny:
        if args.checkpoint:
            write_random_tiny(args.checkpoint, config)
        else:
            args.checkpoint = random_tiny_dir(config)
        print(f"random tiny checkpoint: {args.checkpoint}", file=sys.stderr)
    tokenizer = load_tokenizer(find_tokenizer(args.checkpoint, args.tokenizer))
    try:
        model, params, placement = load_sharded(args.checkpoint, config)
    except CheckpointError as e:
        raise InputError(f"--checkpoint: {e}") from None
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise InputError(
            f"--tokenizer: {tokenizer.path} has {tokenizer.vocab_size} ids > the model's vocab_size "
            f"{model.cfg.vocab_size}"
        )
    inferencer = Inferencer(
        model,
        params,
        tokenizer,
        config.data,
        cached=not args.no_cache,
        max_context_tokens=args.max_context_tokens,
        mesh=placement.mesh,
        rules=placement.rules,
    )
    rng = jax.random.key(args.seed)
    text_kw = dict(do_sample=args.do_sample, temperature=args.temperature)
    image_kw = dict(
        num_timesteps=args.num_timesteps,
        timestep_shift=args.timestep_shift,
        cfg_text_scale=args.cfg_text_scale,
        cfg_img_scale=args.cfg_img_scale,
        cfg_interval=tuple(args.cfg_interval),
        cfg_renorm_type=args.cfg_renorm_type,
        cfg_renorm_min=args.cfg_renorm_min,
    )
    items = ([image] if image is not None else []) + ([args.prompt] if args.prompt else [])
    side = inferencer.vae_rule.max_size
    t2i_hw = (args.height or side, args.width or side)

    if args.mode == "interleave":
        res = inferencer.interleave(
            items,
            rng=rng,
            hw=None if image is not None and not (args.height or args.width) else t2i_hw,
            max_length=args.max_length,
            max_images=args.max_images,
            think=args.think,
            **text_kw,
            **image_kw,
        )
        _write_interleaved(res, args.out)
        return 0
    if args.think:
        out = inferencer.think(
            items,
            understanding=args.mode == "understand",
            rng=rng,
            hw=t2i_hw if args.mode == "t2i" else None,
            max_think_tokens=args.max_think_tokens,
            **text_kw,
            **({} if args.mode == "understand" else image_kw),
        )
        print(f"thinking: {out.thinking}")
        if args.mode == "understand":
            print(out.answer)
            if args.out:
                with open(args.out, "w") as fh:
                    fh.write(out.answer + "\n")
            return 0
        _write_png(out.image, args.out)
        return 0

    if args.mode == "understand":
        text = inferencer.answer(
            image,
            args.prompt,
            max_length=args.max_length,
            do_sample=args.do_sample,
            temperature=args.temperature,
            rng=rng,
        )
        print(text)
        if args.out:
            with open(args.out, "w") as fh:
                fh.write(text + "\n")
        return 0

    sampling = dict(image_kw, rng=rng)
    if args.mode == "t2i":
        out = inferencer.generate(args.prompt, t2i_hw, **sampling)
    else:
        out = inferencer.edit(image, args.prompt, **sampling)
    _write_png(out, args.out)
    return 0


def _write_png(pixels: np.ndarray, path: str) -> None:
    from PIL import Image as PILImage

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    PILImage.fromarray(pixels).save(path)
    print(f"wrote {path} ({pixels.shape[1]}x{pixels.shape[0]})")


def _write_interleaved(res, directory: str) -> None:
    """Each output in order: a text printed and written to NN.txt, an image written to NN.png."""
    os.makedirs(directory, exist_ok=True)
    for k, item in enumerate(res.outputs):
        path = os.path.join(directory, f"{k:02d}")
        if isinstance(item, str):
            print(item)
            with open(path + ".txt", "w") as fh:
                fh.write(item + "\n")
        else:
            _write_png(item, path + ".png")
    print(f"stopped: {res.stopped} ({len(res.outputs)} outputs in {directory})")


if __name__ == "__main__":
    sys.exit(main())
