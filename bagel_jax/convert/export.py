"""A training run's weights → the release layout, so the official code and ``bagel_jax.infer.cli`` load it::

    python -m bagel_jax.convert.export --workdir=RUN --out=DIR [--params=ema|params] [--dtype=bfloat16|float32]

writes ``DIR/{ema.safetensors, ae.safetensors, llm_config.json, vit_config.json, tokenizer.*}`` from the run's
latest checkpoint (``--params=ema``: its EMA, the default; ``params``: the raw weights). The params are restored
sharded (the run's mesh when the device count matches, else fsdp over all devices) and ``ema.safetensors`` is
written tensor by tensor: its header first (every shape is known from the config), then each tensor gathered,
turned into torch layout and appended, so the host holds one tensor at a time, never the model. The FLUX
autoencoder is written in float32, as released. DIR is written under a temporary name and renamed when complete;
an existing DIR is an error (nothing is overwritten). Then::

    python -m bagel_jax.infer.cli --checkpoint=DIR --mode=t2i --prompt="a red circle" --out=x.png
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Iterable, Iterator

import numpy as np

from bagel_jax import cli

SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
DTYPES = ("bfloat16", "float32")
PARAMS = ("ema", "params")


def write_safetensors_streaming(
    path: str, specs: list[tuple[str, tuple[int, ...]]], dtype: str, tensors: Iterable[tuple[str, np.ndarray]]
) -> None:
    """Writes a safetensors file whose header lists ``specs`` ((key, shape), in this order, all of ``dtype``) and
    whose data are ``tensors`` (the same keys, the same order), appended one at a time."""
    np_dtype = np.dtype(dtype)
    header, offset = {}, 0
    for key, shape in specs:
        size = int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize
        header[key] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    order = [k for k, _ in specs]
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        for i, (key, a) in enumerate(tensors):
            if i >= len(order) or key != order[i]:
                raise ValueError(f"{key}: tensor out of the header's order")
            a = np.ascontiguousarray(np.asarray(a).astype(np_dtype))
            if a.shape != tuple(header[key]["shape"]):
                raise ValueError(f"{key}: shape {a.shape}, header says {tuple(header[key]['shape'])}")
            fh.write(a.tobytes())
        if fh.tell() != 8 + len(raw) + offset:
            raise ValueError(f"{path}: {fh.tell()} bytes written, the header covers {8 + len(raw) + offset}")


def _export_mesh(config, devices):
    """The run's mesh when the device count allows it, else fsdp over every device."""
    import copy

    from bagel_jax.config import ConfigError
    from bagel_jax.parallel.mesh import logical_rules, make_mesh

    try:
        return make_mesh(config, devices), logical_rules(config)
    except ConfigError:
        c = copy.deepcopy(config)
        with c.unlocked():
            c.parallel.update(data=1, fsdp=len(devices), tensor=1, sequence=1, dcn_data=1, dcn_fsdp=1)
            c.data.batch_size = len(devices)
        return make_mesh(c, devices), logical_rules(c)


def _to_host(x) -> np.ndarray:
    import jax

    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def release_tensors(params, cfg) -> Iterator[tuple[str, np.ndarray]]:
    """(key, torch-layout host array) for every ``ema.safetensors`` key of ``cfg`` in sorted key order, gathered
    from the (sharded) ``params`` one tensor at a time (a scan-stacked layer param: one layer at a time); a
    LoRA-adapted kernel is exported merged, W + (alpha/rank)·A·B (model/lora.py)."""
    from bagel_jax.convert.bagel_ckpt import entries, to_official
    from bagel_jax.convert.layer_stack import scanned_stacks
    from bagel_jax.model.lora import merge_kernel

    table = {key: (path, kind) for key, path, kind in entries(cfg)}
    stacks = scanned_stacks(cfg)
    for key in sorted(table):
        path, kind = table[key]
        node, layer, parent = params, None, None
        if path[0] in stacks and path[1].startswith("layers_"):
            layer, path = int(path[1].split("_")[1]), (path[0], "layers") + path[2:]
        for p in path:
            node, parent = node[p], node
        host = _to_host(node if layer is None else node[layer])
        if path[-1] == "kernel" and "lora_a" in parent:  # a LoRA-adapted kernel: W + (alpha/rank)·A·B
            host = merge_kernel(path[-2], parent, host, cfg, layer, to_host=_to_host)
        yield key, to_official(kind, host)


def find_run_tokenizer(config, workdir: str) -> str | None:
    """The run's tokenizer file: ``data.tokenizer``, or the synthetic-shapes tokenizer of its data dir."""
    if config.data.tokenizer:
        return config.data.tokenizer
    from bagel_jax.data.builders import synthetic_shapes

    if config.data.builder == synthetic_shapes.NAME:
        path = synthetic_shapes.tokenizer_path(config.data.data_dir or os.path.join(workdir, "data"))
        return path if os.path.isfile(path) else None
    return None


def export_run(workdir: str, out: str, *, which: str = "ema", dtype: str = "bfloat16", devices=None) -> dict:
    """Writes the release layout of ``workdir``'s latest checkpoint to ``out``; returns a summary."""
    import jax
    from flax.core import meta
    from safetensors.numpy import save_file

    from bagel_jax.convert.bagel_ckpt import (
        AE_FILE,
        EMA_FILE,
        LLM_CONFIG,
        VIT_CONFIG,
        llm_config_json,
        official_shapes,
        vit_config_json,
    )
    from bagel_jax.convert.fixed_params import fixed_params, fixed_part
    from bagel_jax.convert.hf_vision import params_to_flux_ae
    from bagel_jax.convert.run_checkpoint import find_state_dir, load_params, load_run_config
    from bagel_jax.model.bagel import make_init_fn
    from bagel_jax.parallel.mesh import logical_shardings

    if which not in PARAMS:
        raise cli.InputError(f"--params: expected one of {PARAMS}, got {which!r}")
    if dtype not in DTYPES:
        raise cli.InputError(f"--dtype: expected one of {DTYPES}, got {dtype!r}")
    if os.path.exists(out):
        raise cli.InputError(f"--out: {out} exists (nothing is overwritten; pick a new directory)")
    try:
        config = load_run_config(workdir)
    except FileNotFoundError as e:
        raise cli.InputError(str(e)) from None
    step_dir = find_state_dir(workdir)
    if step_dir is None:
        raise cli.InputError(f"--workdir: no checkpoint under {workdir} (train at least train.checkpoint_every steps)")
    tokenizer = find_run_tokenizer(config, workdir)
    if tokenizer is None or not os.path.isfile(tokenizer):
        raise cli.InputError(f"--workdir: the run's tokenizer ({tokenizer or 'data.tokenizer: unset'}) is not a file")
    cfg = config.model
    devices = list(jax.devices() if devices is None else devices)
    mesh, rules = _export_mesh(config, devices)
    _, init_fn = make_init_fn(config)
    boxed = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
    shardings = logical_shardings(boxed, mesh, rules)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), meta.unbox(boxed), shardings
    )
    fixed = lambda: fixed_params(config, init_fn, fixed_part(shardings))  # noqa: E731  (if not in the checkpoint)
    params = load_params(workdir, abstract, use_ema=which == "ema", base=fixed)

    tmp = out.rstrip("/") + ".partial"
    if jax.process_index() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    shapes = official_shapes(cfg)
    specs = [(k, shapes[k]) for k in sorted(shapes)]
    tensors = release_tensors(params, cfg)
    if jax.process_index() == 0:
        write_safetensors_streaming(os.path.join(tmp, EMA_FILE), specs, dtype, tensors)
    else:
        for _ in tensors:  # every host takes part in each gather
            pass
    if cfg.visual_gen:
        vae = jax.tree.map(_to_host, params["vae"])
        if jax.process_index() == 0:
            save_file(
                {k: v.astype(np.float32) for k, v in params_to_flux_ae(vae, cfg.vae).items()},
                os.path.join(tmp, AE_FILE),
            )
    if jax.process_index() == 0:
        with open(os.path.join(tmp, LLM_CONFIG), "w") as fh:
            json.dump(llm_config_json(cfg), fh, indent=2)
        if cfg.visual_und:
            with open(os.path.join(tmp, VIT_CONFIG), "w") as fh:
                json.dump(vit_config_json(cfg), fh, indent=2)
        ext = ".json" if tokenizer.endswith(".json") else ".model"
        shutil.copyfile(tokenizer, os.path.join(tmp, "tokenizer" + ext))
        os.rename(tmp, out)
    return {"out": out, "step": int(step_dir.name), "params": which, "dtype": dtype, "tensors": len(specs)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bagel_jax.convert.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="training run directory (checkpoints/, config.json)")
    p.add_argument("--out", required=True, help="new directory for the release layout")
    p.add_argument("--params", default="ema", choices=PARAMS, help="the EMA (default) or the raw params")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="dtype of ema.safetensors")
    args = p.parse_args(argv)
    cli.quiet_platforms()
    with cli.user_errors():
        if not os.path.isdir(args.workdir):
            raise cli.InputError(f"--workdir: {args.workdir} is not a directory")
        summary = export_run(args.workdir, args.out, which=args.params, dtype=args.dtype)
    print(json.dumps(summary), file=sys.stdout)


if __name__ == "__main__":
    main()
