"""Command-line inference with the reference (cache-free) path.

    python -m bagel_jax.infer.cli --checkpoint=/path/BAGEL-7B-MoT --mode=t2i --prompt="a red fox" --out=fox.png
    python -m bagel_jax.infer.cli --checkpoint=DIR --mode=understand --image=cat.jpg --prompt="What is this?"
    python -m bagel_jax.infer.cli --checkpoint=DIR --mode=edit --image=cat.jpg --prompt="make it blue" --out=x.png
    python -m bagel_jax.infer.cli --random_tiny --mode=t2i --prompt="a red square" --out=/tmp/x.png   # smoke run

``--checkpoint`` is a release-layout directory (``ema.safetensors``, ``ae.safetensors``, ``llm_config.json``,
``vit_config.json``, tokenizer files). ``--random_tiny`` first writes a random checkpoint at configs/tiny.py
shapes plus a small SentencePiece tokenizer into ``--checkpoint`` (default: a temporary directory).
Defaults per mode follow the reference's notebook/app (bagel.md §8.4): t2i cfg_text 4, cfg_img 1, interval
[0.4, 1], global renorm; edit cfg_text 4, cfg_img 2, interval [0, 1], text_channel renorm; 50 steps, shift 3;
understanding greedy, max 512 tokens.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

MODES = ("understand", "t2i", "edit")
MODE_DEFAULTS = {
    "t2i": dict(cfg_text_scale=4.0, cfg_img_scale=1.0, cfg_interval="0.4,1.0", cfg_renorm_type="global"),
    "edit": dict(cfg_text_scale=4.0, cfg_img_scale=2.0, cfg_interval="0.0,1.0", cfg_renorm_type="text_channel"),
}
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bagel_jax.infer.cli", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="", help="release-layout directory")
    p.add_argument("--mode", choices=MODES, required=True)
    p.add_argument("--prompt", default="", help="the text input")
    p.add_argument("--image", default="", help="input image (understand / edit)")
    p.add_argument("--out", default="", help="output PNG (t2i / edit) or text file (understand)")
    p.add_argument("--tokenizer", default="", help="tokenizer.json / *.model (default: in --checkpoint)")
    p.add_argument("--config", default="", help="Python config file (path.py[:arg]) for non-checkpoint "
                   "settings (dtype, attention impl, resize rules); default: bagel_jax.config.base_config()")
    p.add_argument("--random_tiny", action="store_true", help="write and use a random tiny checkpoint")
    p.add_argument("--dtype", default="", choices=("", "float32", "bfloat16"), help="compute dtype override")
    p.add_argument("--height", type=int, default=0, help="t2i image height (default: data.vae_transform max)")
    p.add_argument("--width", type=int, default=0)
    p.add_argument("--num_timesteps", type=int, default=50)
    p.add_argument("--timestep_shift", type=float, default=3.0)
    p.add_argument("--cfg_text_scale", type=float, default=None)
    p.add_argument("--cfg_img_scale", type=float, default=None)
    p.add_argument("--cfg_interval", default=None, help="'lo,hi': CFG applies when lo < t <= hi")
    p.add_argument("--cfg_renorm_type", default=None, choices=("global", "channel", "text_channel"))
    p.add_argument("--cfg_renorm_min", type=float, default=0.0)
    p.add_argument("--max_length", type=int, default=512, help="understanding: max fed tokens")
    p.add_argument("--do_sample", action="store_true")
    p.add_argument("--temperature", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not args.checkpoint and not args.random_tiny:
        p.error("--checkpoint is required (or --random_tiny)")
    if args.mode in ("understand", "edit") and not args.image:
        p.error(f"--mode={args.mode} needs --image")
    if args.mode != "understand" and not args.out:
        p.error(f"--mode={args.mode} needs --out (a PNG path)")
    for k, v in MODE_DEFAULTS.get(args.mode, {}).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def write_random_tiny(directory: str, config) -> None:
    """A random release-layout checkpoint at ``config.model`` shapes + a SentencePiece tokenizer."""
    from bagel_jax.convert.bagel_ckpt import write_random_checkpoint
    from bagel_jax.data.builders import synthetic_shapes
    from bagel_jax.data.tokenizer import train_sentencepiece

    write_random_checkpoint(directory, config.model, seed=0)
    tok = train_sentencepiece(synthetic_shapes.corpus(), os.path.join(directory, "tokenizer.model"),
                              vocab_size=config.model.vocab_size)
    if tok.vocab_size > config.model.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} ids > model.vocab_size {config.model.vocab_size}")


def find_tokenizer(checkpoint: str, tokenizer: str = "") -> str:
    """``tokenizer`` if given, else the checkpoint directory's tokenizer.json / tokenizer.model."""
    if tokenizer:
        return tokenizer
    for name in ("tokenizer.json", "tokenizer.model"):
        path = os.path.join(checkpoint, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"--tokenizer: no tokenizer.json or tokenizer.model in {checkpoint}")


def read_image(path: str) -> np.ndarray:
    from PIL import Image as PILImage

    from bagel_jax.data.images import to_rgb
    with PILImage.open(path) as img:
        return np.asarray(to_rgb(img), np.uint8)


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax

    from bagel_jax.config import base_config
    from bagel_jax.convert.bagel_ckpt import load_checkpoint
    from bagel_jax.data.tokenizer import load_tokenizer
    from bagel_jax.infer.api import Inferencer
    from bagel_jax.launch_utils import load_config
    from bagel_jax.model.bagel import Bagel

    config_path = args.config or (os.path.join(REPO_ROOT, "configs", "tiny.py") if args.random_tiny else "")
    config = load_config(config_path) if config_path else base_config()
    if args.random_tiny:
        args.checkpoint = args.checkpoint or tempfile.mkdtemp(prefix="bagel_random_tiny_")
        write_random_tiny(args.checkpoint, config)
        print(f"wrote a random tiny checkpoint to {args.checkpoint}", file=sys.stderr)
    base = config.model
    if args.dtype:
        base.dtype = args.dtype
    model_cfg, params = load_checkpoint(args.checkpoint, base)
    tokenizer = load_tokenizer(find_tokenizer(args.checkpoint, args.tokenizer))
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids > the model's vocab_size {model_cfg.vocab_size}")
    params = jax.tree.map(jax.numpy.asarray, params)
    inferencer = Inferencer(Bagel(model_cfg), params, tokenizer, config.data)
    rng = jax.random.key(args.seed)
    image = read_image(args.image) if args.image else None
    if image is None and not args.prompt:
        raise ValueError("--prompt and/or --image: nothing to condition on")

    if args.mode == "understand":
        text = inferencer.answer(image, args.prompt, max_length=args.max_length, do_sample=args.do_sample,
                                 temperature=args.temperature, rng=rng)
        print(text)
        if args.out:
            with open(args.out, "w") as fh:
                fh.write(text + "\n")
        return 0

    lo, hi = (float(v) for v in args.cfg_interval.split(","))
    sampling = dict(num_timesteps=args.num_timesteps, timestep_shift=args.timestep_shift,
                    cfg_text_scale=args.cfg_text_scale, cfg_img_scale=args.cfg_img_scale, cfg_interval=(lo, hi),
                    cfg_renorm_type=args.cfg_renorm_type, cfg_renorm_min=args.cfg_renorm_min, rng=rng)
    if args.mode == "t2i":
        side = inferencer.vae_rule.max_size
        out = inferencer.generate(args.prompt, (args.height or side, args.width or side), **sampling)
    else:
        out = inferencer.edit(image, args.prompt, **sampling)
    from PIL import Image as PILImage
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    PILImage.fromarray(out).save(args.out)
    print(f"wrote {args.out} ({out.shape[1]}x{out.shape[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
