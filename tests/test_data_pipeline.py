"""The grain pipeline end to end on the shapes data: rows, exact resume, host sharding, skip counters."""

import io
import json
import os
import subprocess
import sys

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image as PILImage

from bagel_jax.batch import FIELDS, PackedBatch, empty_row
from bagel_jax.data.builders import common, synthetic_shapes, t2i
from bagel_jax.data.pipeline import make_dataset, make_train_iterator, record_key, split_key
from bagel_jax.data.records import SKIP_REASONS
from data_fixtures import SHAPES_EXAMPLES, check_rows, shapes_dir, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for f in FIELDS:
            np.testing.assert_array_equal(getattr(x, f), getattr(y, f), err_msg=f)


def test_tiny_config_rows_from_shapes():
    c = tiny_config()
    c.data.mixture.update(video=1.0, web=1.0)
    c.data.max_vae_images = 8  # video/web shapes docs hold up to 6 VAE images
    it = make_train_iterator(c)
    batches = take(it, 4)
    want = empty_row(512, 384, 128, 588, 8, (64, 64))
    for b in batches:
        assert isinstance(b, PackedBatch)
        for f in FIELDS:
            assert getattr(b, f).shape == (2,) + want[f].shape and getattr(b, f).dtype == want[f].dtype, f
        check_rows(b, 384, c.model.max_latent_size, c.model.vit_max_num_patch_per_side)
        assert b.text_ids.max() < c.model.vocab_size
    kinds = {split_key(int(k))[0] for k in it.last_extras["records"].ravel() if k >= 0}
    assert kinds, "rows carry the record ids of their documents"
    m = it.metrics()
    assert m["data/rows"] == 8 and 0 < m["data/fill"] <= 1
    assert set(k.split("/")[-1] for k in m if k.startswith("data/skipped/")) == set(SKIP_REASONS)


def test_resume_continues_with_exactly_the_same_rows(tmp_path):
    c = tiny_config()
    it = make_train_iterator(c)
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    after = take(it, 4)
    again = make_train_iterator(c)
    again.set_state(state)
    assert_same_batches(take(again, 4), after)
    assert again.skip_counts() == it.skip_counts() and again.rows == it.rows
    # through orbax's grain checkpoint handler (what the trainer stores)
    handler = grain.checkpoint.CheckpointHandler()
    handler.save(tmp_path, item=it)
    nxt = take(it, 2)
    restored = make_train_iterator(c)
    handler.restore(tmp_path, item=restored)
    assert_same_batches(take(restored, 2), nxt)


def test_resume_with_worker_processes():
    c = tiny_config(num_workers=2)
    it = make_train_iterator(c)
    try:
        take(it, 3)
        state = it.get_state()
        after = take(it, 3)
    finally:
        it.close()
    again = make_train_iterator(c)
    try:
        again.set_state(state)
        assert_same_batches(take(again, 3), after)
        check_rows(after[0], 384, c.model.max_latent_size, c.model.vit_max_num_patch_per_side)
    finally:
        again.close()


def _records(c, process_index, process_count):
    it = make_train_iterator(c, process_index, process_count, num_epochs=1)
    out = []
    for _ in it:
        out += [int(k) for k in it.last_extras["records"].ravel() if k >= 0]
    return out, it


@pytest.mark.parametrize("kind", ["vlm", "edit"])
def test_two_hosts_read_disjoint_data_covering_the_epoch(kind):
    c = tiny_config()
    c.data.mixture.update(t2i=0.0, vlm=0.0, edit=0.0)
    c.data.mixture[kind] = 1.0
    c.data.batch_size = 2
    h0, it0 = _records(c, 0, 2)
    h1, it1 = _records(c, 1, 2)
    assert sum(it0.skip_counts().values()) + sum(it1.skip_counts().values()) == 0
    assert len(h0) == len(set(h0)) and len(h1) == len(set(h1))
    assert not set(h0) & set(h1)
    assert sorted(h0 + h1) == [record_key(kind, i) for i in range(SHAPES_EXAMPLES)]
    one, _ = _records(c, 0, 1)
    assert sorted(one) == sorted(h0 + h1)


def jpeg(w, h):
    b = io.BytesIO()
    PILImage.new("RGB", (w, h), (30, 60, 90)).save(b, format="JPEG")
    return b.getvalue()


def bad_t2i_config(tmp_path, **data):
    """The tiny config reading a t2i parquet of 3 good rows and 6 bad ones (reasons in BAD_T2I_SKIPS)."""
    manual = tmp_path / "manual"
    manual.mkdir()
    good = jpeg(64, 48)
    rows = [
        (good, "a red circle"),
        (good, "a blue square"),
        (good, "two green triangles"),
        (b"\x89PNG broken", "a red circle"),
        (good[: len(good) // 3], "a red circle"),  # undecodable x2
        (good, "   "),  # empty text
        (jpeg(300, 300), "a red circle"),  # beyond max_input_pixels
        (good, " ".join(["a red circle at the top left"] * 80)),  # cannot fit an empty row (und_len 384)
        ({"bytes": None, "path": str(tmp_path / "missing.jpg")}, "a red circle"),  # missing file
    ]
    images = [r[0] if isinstance(r[0], dict) else {"bytes": r[0], "path": None} for r in rows]
    pq.write_table(pa.table({"image": images, "caption": [r[1] for r in rows]}), manual / "t2i.parquet")
    common.build(t2i.T2i, tmp_path / "data", manual)
    c = tiny_config(
        str(tmp_path / "data"),
        tokenizer=synthetic_shapes.tokenizer_path(shapes_dir()),
        builder="",
        max_input_pixels=50_000,
        **data,
    )
    c.data.mixture.update(t2i=1.0, vlm=0.0, edit=0.0)
    c.data.sources.t2i = "t2i"
    return c


BAD_T2I_SKIPS = dict.fromkeys(SKIP_REASONS, 0) | dict(
    undecodable_image=2, empty_text=1, image_too_large=1, too_large=1, missing_file=1
)


def test_bad_records_are_skipped_and_counted_by_reason(tmp_path, caplog):
    c = bad_t2i_config(tmp_path)
    it = make_train_iterator(c, num_epochs=1)
    placed = []
    for _ in it:
        placed += [int(k) for k in it.last_extras["records"].ravel() if k >= 0]
    assert it.skip_counts() == BAD_T2I_SKIPS
    assert len(placed) == 3
    assert it.metrics()["data/skipped/undecodable_image"] == 2
    # the same counts, and the same messages naming file:row, when two worker processes share the work
    caplog.clear()
    caplog.set_level("WARNING")
    it = make_train_iterator(c, num_epochs=1, num_workers=2)
    try:
        for _ in it:
            pass
        assert it.skip_counts() == BAD_T2I_SKIPS
    finally:
        it.close()
    logged = [r.getMessage() for r in caplog.records if r.name == "bagel_jax.data"]
    for row, reason in [
        (3, "undecodable_image"),
        (4, "undecodable_image"),
        (5, "empty_text"),
        (6, "image_too_large"),
        (7, "too_large"),
        (8, "missing_file"),
    ]:
        assert any(f"({reason}): t2i.parquet:row {row}: " in m for m in logged), (row, logged)


LEAK_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
KEEP = []  # batches still referenced at exit, as device buffers aliasing host memory keep them


def main(tmp):
    import pathlib
    from test_data_pipeline import bad_t2i_config
    from bagel_jax.data.pipeline import make_train_iterator
    it = make_train_iterator(bad_t2i_config(pathlib.Path(tmp), num_workers=2))  # repeats forever, never closed
    KEEP.extend(next(it) for _ in range(4))
    print(json.dumps(it.skip_counts()))


if __name__ == "__main__":
    main(sys.argv[2])
"""


def test_worker_batches_leak_no_shared_memory_at_exit(tmp_path):
    """A trainer exits holding its last batches and without closing the iterator: no shared memory is left."""
    script = tmp_path / "leak.py"
    script.write_text(LEAK_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(script), os.path.join(ROOT, "tests"), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["undecodable_image"] >= 2
    assert "leaked shared_memory" not in proc.stderr, proc.stderr[-3000:]
    assert "(undecodable_image): t2i.parquet:row 3: image 0: undecodable image" in proc.stderr


def test_config_errors_name_the_key():
    c = tiny_config()
    c.data.batch_size = 3
    with pytest.raises(ValueError, match="batch_size 3 is not divisible by process_count 2"):
        make_dataset(c, 0, 2)
    c = tiny_config()
    c.model.vocab_size = 50
    with pytest.raises(ValueError, match="data.tokenizer: .* ids > model.vocab_size 50"):
        make_dataset(c)
    c = tiny_config()
    c.data.sources.vlm = "nothing_here:train"
    with pytest.raises(FileNotFoundError, match="no built dataset 'nothing_here'"):
        make_dataset(c)
