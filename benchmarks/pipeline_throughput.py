"""Pipeline throughput: real (non-padding) packed tokens per second, JPEG decode → resize → patchify → pack.

The mix of benchmarks/pack_fill.py, as real files built with our TFDS builders (cached in --workdir):
* T2I   JPEG (q 90) 512–1024 px per side, caption 20–200 words → t2i builder (parquet);
* VLM   JPEG 224–980 px, 1–3 turns (question 10–80 words, answer 20–400) → vlm_sft builder (jsonl + images);
* Edit  JPEG pairs 512–1024 px, instruction 8–60 words → edit builder (parquet).
Transforms as the reference's example.yaml: VAE (1024, 512, 16) for all; ViT (980, 378, 14, 2_007_040) for VLM,
(518, 224, 14) for edit. Rows: L = 32768 (und 11520, gen 21248, 12 VAE images of 1024², 1 row per batch).

``--pixel_dtype uint8`` ships raw pixels (the model normalises on device) instead of float32 in [-1, 1].
Prints one line, measured over ``--batches`` rows after ``--warmup`` rows, with ``--workers`` grain worker
processes (mp_prefetch):
* K real tokens/s wall: non-padding tokens of the rows ÷ wall-clock seconds (depends on what else the machine runs);
* tokens per CPU-second: the same tokens ÷ CPU seconds used by the main process and its workers, and that × the
  number of workers ("tokens/s on N dedicated cores"): the throughput if each worker had a core to itself;
* last-row fill, and the CPU seconds of the main process and of the workers.
``--mix image,video`` (default) measures the image mix above and a video mix side by side in one run: VLM video SFT
(``video`` files in the vlm_sft jsonl: H.264 mp4, 640x360, 8 s at 24 fps, a pan over a photo, 8–12 frames sampled,
``img_num`` resize) and interleaved video (the same kind of files cut into shots, clips of up to 8 frames, future-frame
samples with ``frame_delta`` splits), half each; it also reports images per second (VAE + ViT images delivered: video
frames in the video mix).
There is no column for the official pipeline: it is not run here (its ≈200K real tokens/s with 2 workers,
quoted in docs/EXPERIMENTS.md, was measured elsewhere).

    python benchmarks/pipeline_throughput.py [--workers 2] [--batches 40] [--workdir /tmp/bagel_pipeline_bench]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SYLLABLES = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "ve", "da", "zu", "fe", "go", "hi", "ja", "ru"]


def words(rng, n: int) -> str:
    return " ".join("".join(rng.choice(SYLLABLES, size=rng.integers(1, 4))) for _ in range(n))


def photo(rng, w: int, h: int) -> bytes:
    """A JPEG with smooth gradients, shapes, blur and sensor-like noise (decodes like a photo, unlike flat art)."""
    base = Image.fromarray((rng.random((h // 16 + 2, w // 16 + 2, 3)) * 255).astype(np.uint8)).resize(
        (w, h), Image.BICUBIC
    )
    draw = ImageDraw.Draw(base)
    for _ in range(12):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        r = int(rng.integers(10, max(w, h) // 4))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    img = np.asarray(base.filter(ImageFilter.GaussianBlur(2))).astype(np.int16)
    img = np.clip(img + rng.integers(-6, 7, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_files(root: str, n: int, seed: int = 0) -> None:
    """Writes n samples per kind in the users' formats under root/{t2i,vlm,edit}."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    os.makedirs(f"{root}/t2i", exist_ok=True)
    side = lambda lo, hi: (int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1)))  # noqa: E731
    imgs, caps = [], []
    for _ in range(n):
        imgs.append(photo(rng, *side(512, 1024)))
        caps.append(json.dumps({"caption": words(rng, int(rng.integers(20, 201)))}))
    pq.write_table(pa.table({"image": imgs, "captions": caps}), f"{root}/t2i/t2i.parquet")
    os.makedirs(f"{root}/vlm/images", exist_ok=True)
    with open(f"{root}/vlm/data.jsonl", "w") as f:
        for i in range(n):
            with open(f"{root}/vlm/images/{i}.jpg", "wb") as g:
                g.write(photo(rng, *side(224, 980)))
            conv = []
            for t in range(int(rng.integers(1, 4))):
                q = ("<image>\n" if t == 0 else "") + words(rng, int(rng.integers(10, 81)))
                answer = words(rng, int(rng.integers(20, 401)))
                conv += [{"from": "human", "value": q}, {"from": "gpt", "value": answer}]
            f.write(json.dumps({"image": f"{i}.jpg", "conversations": conv}) + "\n")
    os.makedirs(f"{root}/edit", exist_ok=True)
    lists, instr = [], []
    for _ in range(n):
        w, h = side(512, 1024)
        lists.append([photo(rng, w, h), photo(rng, w, h)])
        instr.append([[words(rng, int(rng.integers(8, 61)))]])
    pq.write_table(pa.table({"image_list": lists, "instruction_list": instr}), f"{root}/edit/edit.parquet")


def pan_video(rng, path: str, w: int = 640, h: int = 360, seconds: int = 8, fps: int = 24) -> None:
    """An H.264 mp4: the camera pans across a photo (camera-like content for the codec)."""
    import av

    big = np.asarray(Image.open(io.BytesIO(photo(rng, 2 * w + 4 * seconds * fps, 2 * h))))
    with av.open(path, "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt, s.gop_size = w, h, "yuv420p", 2 * fps
        s.options = {"crf": "23", "preset": "veryfast"}
        for i in range(seconds * fps):
            frame = np.ascontiguousarray(big[:, 4 * i : 4 * i + 2 * w][::2, ::2])
            for packet in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)


def make_video_files(root: str, n: int, seed: int = 2) -> None:
    """n video files for each of root/{vlm_video, video} with their jsonl."""
    rng = np.random.default_rng(seed)
    for sub in ("vlm_video", "video"):
        os.makedirs(f"{root}/{sub}", exist_ok=True)
        with open(f"{root}/{sub}/data.jsonl", "w") as f:
            for i in range(n):
                pan_video(rng, f"{root}/{sub}/{i}.mp4")
                if sub == "video":
                    f.write(json.dumps({"video": f"{i}.mp4", "duration": 8}) + "\n")
                    continue
                conv = [
                    {"from": "human", "value": "<video>\n" + words(rng, int(rng.integers(10, 41)))},
                    {"from": "gpt", "value": words(rng, int(rng.integers(20, 201)))},
                ]
                f.write(json.dumps({"video": f"{i}.mp4", "conversations": conv}) + "\n")


def prepare_video(workdir: str, n: int) -> str:
    """Video files → vlm_sft (video) and interleaved_video records; cached in workdir."""
    from bagel_jax.data.builders import common, interleaved_video, vlm_sft

    data_dir = f"{workdir}/tfds_video"
    if not os.path.exists(f"{workdir}/done_video_{n}"):
        t = time.time()
        make_video_files(f"{workdir}/files", n)
        common.build(vlm_sft.VlmSft, data_dir, f"{workdir}/files/vlm_video")
        common.build(interleaved_video.InterleavedVideo, data_dir, f"{workdir}/files/video")
        open(f"{workdir}/done_video_{n}", "w").close()
        print(f"built {2 * n} video samples in {time.time() - t:.0f}s")
    return data_dir


def prepare(workdir: str, n: int) -> tuple[str, str]:
    """Files → TFDS (ArrayRecord) with our builders, and a SentencePiece tokenizer; cached in workdir."""
    from bagel_jax.data.builders import common, edit, t2i, vlm_sft
    from bagel_jax.data.tokenizer import train_sentencepiece

    data_dir, tok = f"{workdir}/tfds", f"{workdir}/tokenizer.model"
    if not os.path.exists(f"{workdir}/done_{n}"):
        t = time.time()
        make_files(f"{workdir}/files", n)
        for cls, sub in ((t2i.T2i, "t2i"), (vlm_sft.VlmSft, "vlm"), (edit.Edit, "edit")):
            common.build(cls, data_dir, f"{workdir}/files/{sub}")
        rng = np.random.default_rng(1)
        train_sentencepiece([words(rng, 50) for _ in range(3000)], tok, vocab_size=4096)
        open(f"{workdir}/done_{n}", "w").close()
        print(f"built {3 * n} samples in {time.time() - t:.0f}s")
    return data_dir, tok


def config(data_dir: str, tok: str, workers: int, pixel_dtype: str = "float32", mix: str = "image"):
    from bagel_jax.config import base_config, validate

    c = base_config()
    d = c.data
    d.update(
        data_dir=data_dir,
        tokenizer=tok,
        builder="",
        num_workers=workers,
        batch_size=1,
        seq_len=32768,
        und_len=11520,
        gen_len=21248,
        max_vit_patches=11520,
        max_vae_images=12,
        vae_image_size=(1024, 1024),
        vit_transform=(980, 224, 14),
        vae_transform=(1024, 512, 16),
        prefetch=4,
        pixel_dtype=pixel_dtype,
    )
    d.sources.update(t2i="t2i", vlm="vlm_sft", edit="edit")
    d.vit_transform_by_kind.update(vlm=(980, 378, 14, 2_007_040), edit=(518, 224, 14))
    d.mixture.update(t2i=1.0, vlm=1.0, edit=1.0, video=0.0, web=0.0)
    if mix == "video":
        d.sources.update(vlm="vlm_sft", video="interleaved_video")
        d.mixture.update(t2i=0.0, vlm=1.0, edit=0.0, video=1.0)
        d.vit_transform_by_kind.update(video=(518, 224, 14))
    c.model.vocab_size = 4096
    return validate(c)


def _cpu_seconds(pids) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def _children() -> list[int]:
    me = str(os.getpid())
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1] == me:
                    out.append(int(pid))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                pass
    return out


def run(cfg, batches: int, warmup: int) -> dict:
    from bagel_jax.data.pipeline import make_train_iterator

    it = make_train_iterator(cfg)
    try:
        for _ in range(warmup):
            next(it)
        kids = _children()
        cpu0, own0, tok0, t0 = _cpu_seconds(kids), time.process_time(), it.real_tokens.sum(), time.perf_counter()
        frames = 0
        for _ in range(batches):
            b = next(it)
            vit = np.asarray(b.vit_image)
            frames += int((np.asarray(b.vae_hw)[..., 0] > 0).sum()) + sum(len(np.unique(r[r > 0])) for r in vit)
        wall = time.perf_counter() - t0
        main_cpu, worker_cpu = time.process_time() - own0, _cpu_seconds(kids) - cpu0
        cpu = main_cpu + worker_cpu
        tokens = int(it.real_tokens.sum() - tok0)
        m = it.metrics()
    finally:
        it.close()
    return dict(
        tokens=tokens,
        frames=frames,
        wall=wall,
        cpu=cpu,
        main_cpu=main_cpu,
        worker_cpu=worker_cpu,
        fill=m["data/fill"],
        load=os.getloadavg()[0],
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--samples", type=int, default=120, help="samples per kind in the generated data")
    p.add_argument("--workdir", default="/tmp/bagel_pipeline_bench")
    p.add_argument("--pixel_dtype", default="float32", choices=("float32", "uint8"))
    p.add_argument("--mix", default="image,video", help="comma-separated: image, video (each measured in turn)")
    a = p.parse_args(argv)
    data_dir, tok = prepare(a.workdir, a.samples)
    for mix in a.mix.split(","):
        if mix == "video":
            d = prepare_video(a.workdir, max(8, a.samples // 4))
        elif mix == "image":
            d = data_dir
        else:
            raise SystemExit(f"--mix: unknown mix {mix!r} (image, video)")
        r = run(config(d, tok, a.workers, a.pixel_dtype, mix), a.batches, a.warmup)
        ncpu = max(a.workers, 1)
        print(
            f"{mix:5s} mix, {a.pixel_dtype} pixels, {a.workers} workers, {a.batches} rows of 32768: "
            f"{r['tokens'] / r['wall'] / 1e3:.0f}K real tokens/s wall, {r['frames'] / r['wall']:.0f} images/s "
            f"(load avg {r['load']:.1f} on {os.cpu_count()} cores); {r['tokens'] / r['cpu'] / 1e3:.0f}K tokens per "
            f"CPU-second -> {ncpu * r['tokens'] / r['cpu'] / 1e3:.0f}K tokens/s and "
            f"{ncpu * r['frames'] / r['cpu']:.0f} images/s on {ncpu} dedicated cores; "
            f"last-row fill {100 * r['fill']:.1f}%; CPU s: main {r['main_cpu']:.1f}, workers {r['worker_cpu']:.1f}, "
            f"wall {r['wall']:.1f}"
        )


if __name__ == "__main__":
    main()
