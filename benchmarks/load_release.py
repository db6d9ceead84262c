"""Peak host RSS while loading a release folder onto 8 (simulated CPU) devices: sharded vs naive.

    python benchmarks/load_release.py [--layers=12] [--hidden=1024] [--vocab=65536]

Writes a random release (f32 ``ema.safetensors`` ≥ 2 GB by default) into a temp dir (deleted at the end), then in
two fresh subprocesses, each on 8 CPU devices with fsdp=8 (the trainer's shardings from the logical rules):

* sharded: ``convert.release_sharded.load_release_sharded`` (each tensor read slice by slice into its shards);
* naive: ``safetensors.numpy.load_file`` of the whole file, then each tensor converted and ``device_put``.

Reported per run (``ru_maxrss``): peak RSS − RSS before loading ("peak extra"), the bytes of the loaded params
(on CPU "device" buffers are host memory, so they count in RSS whatever the loader), and the overhead = peak extra −
params, against the largest tensor and the whole file. Goal: sharded overhead ≤ 2 × the largest tensor.

Measured (2 shared CPU cores, the defaults: 12 MoT layers, hidden 1024, vocab 65536; ema.safetensors 1915 MiB
= 2.01 GB f32, largest tensor 256 MiB; MiB):

    | load    | RSS before | peak | peak extra | params held | overhead (peak extra − params) | / largest tensor |
    |---------|-----------:|-----:|-----------:|------------:|-------------------------------:|-----------------:|
    | sharded |        261 | 2504 |       2244 |        1916 |                            327 |             1.28 |
    | naive   |        261 | 4376 |       4115 |        1916 |                           2199 |             8.59 |

The sharded load meets the goal (overhead 1.28 × the largest tensor ≤ 2 ×); the naive load holds the whole file
on the host (≈ 1.15 × the file) on top of the params.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(layers: int, hidden: int, vocab: int):
    sys.path.insert(0, ROOT)
    from bagel_jax.launch_utils import load_config

    c = load_config(os.path.join(ROOT, "configs", "tiny.py"))
    c.model.update(
        num_layers=layers,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        vocab_size=vocab,
        num_heads=hidden // 64,
        num_kv_heads=max(hidden // 256, 1),
        head_dim=0,
    )
    c.parallel.update(data=1, fsdp=8, tensor=1)
    c.data.batch_size = 8
    return c


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _measure(mode: str, directory: str, layers: int, hidden: int, vocab: int) -> dict:
    """Runs in a fresh subprocess: loads ``directory`` the ``mode`` way onto 8 devices; returns the numbers."""
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import flax.linen as nn
    import jax
    import numpy as np

    from bagel_jax.convert import bagel_ckpt as bc
    from bagel_jax.convert.release_sharded import load_release_sharded
    from bagel_jax.model.bagel import make_init_fn
    from bagel_jax.parallel.mesh import logical_rules, logical_shardings, make_mesh

    config = _config(layers, hidden, vocab)
    cfg = config.model
    _, init_fn = make_init_fn(config)
    boxed = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
    shardings = logical_shardings(boxed, make_mesh(config, jax.devices()), logical_rules(config))
    like = nn.unbox(boxed)
    before = _rss_mb()
    if mode == "sharded":
        params = load_release_sharded(directory, cfg, shardings, like)
    else:
        from safetensors.numpy import load_file

        sd = load_file(os.path.join(directory, bc.EMA_FILE))  # the whole model on the host
        flat_sh = {tuple(k.key for k in kp): s for kp, s in jax.tree_util.tree_leaves_with_path(shardings)}
        params = {}
        hd = cfg.hidden_size // cfg.num_heads
        for key, path, kind in bc.entries(cfg):
            bc._set(
                params,
                path,
                jax.device_put(np.ascontiguousarray(bc.to_ours(kind, sd[key], hd).astype(np.float32)), flat_sh[path]),
            )
        params["vae"] = bc.load_vae_params(
            os.path.join(directory, bc.AE_FILE), cfg, dtype=np.float32, place=lambda p, a: jax.device_put(a, flat_sh[p])
        )
    jax.block_until_ready(params)
    after = _rss_mb()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    nbytes = sum(x.nbytes for x in jax.tree.leaves(params)) / 2**20
    return dict(
        mode=mode,
        rss_before_mb=round(before),
        rss_after_mb=round(after),
        peak_mb=round(peak),
        peak_extra_mb=round(peak - before),
        params_mb=round(nbytes),
        overhead_mb=round(peak - before - nbytes),
    )


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--measure", default="", help=argparse.SUPPRESS)
    p.add_argument("--dir", default="", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.measure:
        print(json.dumps(_measure(a.measure, a.dir, a.layers, a.hidden, a.vocab)))
        return
    tmp = tempfile.mkdtemp(prefix="load_release_")
    try:
        gen = (
            f"import sys; sys.path.insert(0, {ROOT!r}); from benchmarks.load_release import _config; "
            "from bagel_jax.convert.bagel_ckpt import write_random_checkpoint; "
            f"write_random_checkpoint({tmp!r}, _config({a.layers}, {a.hidden}, {a.vocab}).model)"
        )
        subprocess.run([sys.executable, "-c", gen], check=True, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        from safetensors import safe_open

        path = os.path.join(tmp, "ema.safetensors")
        with safe_open(path, framework="numpy") as f:
            import numpy as np

            largest = max(int(np.prod(f.get_slice(k).get_shape())) * 4 for k in f.keys()) / 2**20
        file_mb = os.path.getsize(path) / 2**20
        print(f"ema.safetensors {file_mb:.0f} MiB, largest tensor {largest:.0f} MiB")
        for mode in ("sharded", "naive"):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    f"--measure={mode}",
                    f"--dir={tmp}",
                    f"--layers={a.layers}",
                    f"--hidden={a.hidden}",
                    f"--vocab={a.vocab}",
                ],
                check=True,
                cwd=ROOT,
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONPATH": ROOT},
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r.update(
                file_mb=round(file_mb),
                largest_tensor_mb=round(largest),
                overhead_over_largest=round(r["overhead_mb"] / largest, 2),
            )
            print(json.dumps(r))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
