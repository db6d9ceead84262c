"""``data.pixel_dtype="uint8"`` (4× fewer host bytes; normalised on device) gives the same model losses
as the float32 PackedBatch contract on the same data."""

import jax
import numpy as np

from bagel_jax.data.pipeline import make_train_iterator
from bagel_jax.model.bagel import make_init_fn
from bagel_jax.train.losses import make_loss_fn
from data_fixtures import tiny_config


def test_uint8_pixels_equal_float32_pixels():
    rows = {}
    for dtype in ("float32", "uint8"):
        cfg = tiny_config(pixel_dtype=dtype)
        rows[dtype] = next(make_train_iterator(cfg))
    assert rows["uint8"].vae_images.dtype == np.uint8 and rows["float32"].vae_images.dtype == np.float32
    assert rows["uint8"].vae_images.nbytes * 4 == rows["float32"].vae_images.nbytes
    for f in ("kind", "doc", "index", "text_ids", "vae_hw", "vae_src", "vit_slot"):
        np.testing.assert_array_equal(getattr(rows["uint8"], f), getattr(rows["float32"], f), err_msg=f)
    cfg = tiny_config()
    model, init_fn = make_init_fn(cfg)
    params = jax.jit(init_fn)(jax.random.PRNGKey(0))
    loss_fn = jax.jit(make_loss_fn(model, cfg))
    out = {k: loss_fn(params, jax.tree.map(jax.numpy.asarray, b), jax.random.PRNGKey(1))[1] for k, b in rows.items()}
    for key in ("ce_sum", "mse_sum", "ce_count", "mse_count"):
        np.testing.assert_allclose(float(out["uint8"][key]), float(out["float32"][key]), rtol=1e-5, err_msg=key)
