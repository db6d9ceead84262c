"""Image preprocessing (bagel_jax/data/images.py) against the reference rules, written out in the tests."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from bagel_jax.data import images as im
from bagel_jax.data.images import ImageError, ResizeRule

# (rule, (w, h), img_num) -> (w', h'), each worked out by hand from MaxLongEdgeMinShortEdgeResize:
#   s = max(min(max/max(w,h), 1), min/min(w,h)); (w,h) = div(round(w*s)), div(round(h*s)); div(v) = max(S, round(v/S)*S)
#   if w*h > max_pixels/img_num: rescale by max_pixels/img_num/(w*h); if max(w,h) > max: rescale by max/max(w,h)
RESIZE_TABLE = [
    # no scaling, banker's rounding in div: 40/16 = 2.5 -> 2 (32), 600/16 = 37.5 -> 38 (608)
    ((1024, 32, 16), (40, 600), 1, (32, 608)),
    # VAE rule (app / t2i yaml): 1000/16 = 62.5 -> 62 (992)
    ((1024, 512, 16), (1000, 800), 1, (992, 800)),
    ((1024, 512, 16), (2048, 2048), 1, (1024, 1024)),
    # min side wins (s = 0.512), then the long side 1536 > 1024 is scaled back: 341.33 -> 341 -> 21*16 = 336
    ((1024, 512, 16), (3000, 1000), 1, (1024, 336)),
    # ViT rule: small image scaled up to min side 224
    ((980, 224, 14), (100, 50), 1, (448, 224)),
    # min side scale gives 2240 x 224, then max side rule: s = 0.4375 -> 980 x 98
    ((980, 224, 14), (1000, 100), 1, (980, 98)),
    ((980, 224, 14), (3000, 3000), 1, (980, 980)),
    # vlm_sft rule with max_pixels: 980x980 fits 2_007_040, but not 2_007_040 / 4 images:
    # s = 501760 / 960400 (an area ratio applied to the sides, as the reference does) -> 512 -> 36.57 -> 37*14 = 518
    ((980, 378, 14, 2_007_040), (2000, 2000), 1, (980, 980)),
    ((980, 378, 14, 2_007_040), (2000, 2000), 4, (518, 518)),
    # default max_pixels 1_806_336 < 1536^2: s = 0.765625 -> 1176 -> 73.5 -> 74 (banker's, even) * 16 = 1184
    ((2048, 1536, 16), (1536, 1536), 1, (1184, 1184)),
    # tiny config rules on a 96x80 shapes image
    ((64, 32, 16), (96, 80), 1, (64, 48)),
    ((112, 56, 14), (96, 80), 1, (98, 84)),
]


@pytest.mark.parametrize("spec,size,img_num,expected", RESIZE_TABLE)
def test_resize_table(spec, size, img_num, expected):
    rule = ResizeRule.from_tuple(spec)
    assert rule.target_size(*size, img_num=img_num) == expected
    out = im.resize(Image.new("RGB", size, (10, 20, 30)), rule, img_num=img_num)
    assert out.shape == (expected[1], expected[0], 3) and out.dtype == np.uint8


def test_resize_pixels_are_pil_bicubic():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    rule = ResizeRule(64, 32, 16)
    w, h = rule.target_size(70, 50)
    want = np.asarray(Image.fromarray(arr).resize((w, h), Image.BICUBIC))
    np.testing.assert_array_equal(im.resize(arr, rule), want)
    # already at a valid size: untouched
    same = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    np.testing.assert_array_equal(im.resize(same, rule), same)


def test_normalize_matches_to_tensor_normalize():
    x = np.arange(256, dtype=np.uint8).reshape(1, 256, 1).repeat(3, axis=2)
    ref = torch.from_numpy(x).permute(2, 0, 1).float().div(255)  # ToTensor
    ref = ref.sub(torch.tensor([0.5] * 3)[:, None, None]).div(torch.tensor([0.5] * 3)[:, None, None])  # Normalize
    out = im.normalize(x)
    np.testing.assert_array_equal(out, ref.permute(1, 2, 0).numpy())
    assert out.min() == -1.0 and out.max() == 1.0
    buf = np.zeros((4, 300, 3), np.float32)
    im.normalize(x, out=buf[1:2, 10:266])
    np.testing.assert_array_equal(buf[1, 10:266], out[0])
    assert not buf[0].any() and not buf[1, :10].any()


def test_patchify_matches_reference_einsum():
    rng = np.random.default_rng(1)
    img = rng.random((42, 28, 3)).astype(np.float32)
    p = 14
    chw = torch.from_numpy(img).permute(2, 0, 1)  # the reference patchifies C,H,W tensors
    c, h, w = chw.shape
    ref = torch.einsum("chpwq->hwpqc", chw.reshape(c, h // p, p, w // p, p)).reshape(-1, p * p * c).numpy()
    out = im.patchify(img, p)
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(im.unpatchify(out, (h // p, w // p), p), img)
    u8 = rng.integers(0, 256, (28, 56, 3), dtype=np.uint8)
    np.testing.assert_array_equal(im.unpatchify(im.patchify(u8, 14), (2, 4), 14), u8)


@pytest.mark.parametrize("h,w,s", [(3, 5, 70), (4, 4, 4), (1, 7, 8), (70, 70, 70), (2, 3, 64)])
def test_position_ids_extrapolate_formula(h, w, s):
    ids = im.flattened_position_ids(h * 14, w * 14, 14, s)
    want = [r * s + c for r in range(h) for c in range(w)]
    assert ids.tolist() == want and ids.dtype == np.int32


@pytest.mark.parametrize("n_h,n_w,s", [(3, 5, 70), (7, 7, 70), (70, 70, 70), (13, 2, 8), (64, 33, 64), (5, 9, 4)])
def test_position_ids_interpolate_formula(n_h, n_w, s):
    # the reference: bucketize(arange(0, 1-1e-6, 1/n), arange(1/S, 1, 1/S), right=True), torch float32
    boundaries = torch.arange(1 / s, 1.0, 1 / s)
    bh = torch.bucketize(torch.arange(0, 1 - 1e-6, 1 / n_h), boundaries, right=True)
    bw = torch.bucketize(torch.arange(0, 1 - 1e-6, 1 / n_w), boundaries, right=True)
    want = (bh[:, None] * s + bw).flatten().numpy()
    got = im.flattened_position_ids(n_h * 16, n_w * 16, 16, s, interpolate=True)
    np.testing.assert_array_equal(got, want)


def _png(img: Image.Image) -> bytes:
    b = io.BytesIO()
    img.save(b, format="PNG")
    return b.getvalue()


def test_decode_converts_like_pil_img2rgb():
    rgba = Image.new("RGBA", (8, 6), (255, 0, 0, 0))  # fully transparent -> white background
    out = im.decode_image(_png(rgba), "t.png")
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255)
    gray = Image.new("L", (8, 6), 7)
    assert im.decode_image(_png(gray), "g.png").getpixel((1, 1)) == (7, 7, 7)


@pytest.mark.parametrize(
    "make,reason,needles",
    [
        (lambda: Image.new("L", (20, 20)), "bad_image", ["img_a", "RGB", "'L'"]),
        (lambda: Image.new("RGBA", (20, 20)), "bad_image", ["img_a", "RGB", "'RGBA'"]),
        (lambda: np.zeros((20, 20), np.uint8), "bad_image", ["img_a", "[H, W, 3]"]),
        (lambda: np.zeros((20, 20, 4), np.uint8), "bad_image", ["img_a", "[H, W, 3]"]),
        (lambda: np.zeros((20, 20, 3), np.float32), "bad_image", ["img_a", "uint8"]),
        (lambda: np.zeros((0, 20, 3), np.uint8), "bad_image", ["img_a", "zero-size"]),
        (lambda: np.zeros((100, 100, 3), np.uint8), "image_too_large", ["img_a", "max_input_pixels=5000"]),
    ],
)
def test_bad_input_raises_naming_image_and_limit(make, reason, needles):
    with pytest.raises(ImageError) as e:
        im.resize(make(), ResizeRule(64, 32, 16), name="img_a", max_input_pixels=5000)
    assert e.value.reason == reason
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg


def test_bad_bytes_and_limits():
    with pytest.raises(ImageError, match="cat.jpg: undecodable image") as e:
        im.decode_image(b"not an image", "cat.jpg")
    assert e.value.reason == "undecodable_image"
    with pytest.raises(ImageError, match="dog.jpg: empty image bytes") as e:
        im.decode_image(b"", "dog.jpg")
    assert e.value.reason == "missing_file"
    png = _png(Image.new("RGB", (300, 200)))
    with pytest.raises(ImageError, match=r"big.png: 300x200 = 60000 pixels exceeds the limit max_input_pixels=1000"):
        im.decode_image(png, "big.png", max_input_pixels=1000)
    truncated = png[: len(png) // 2]
    with pytest.raises(ImageError, match="trunc.png: undecodable"):
        im.decode_image(truncated, "trunc.png")
    with pytest.raises(ImageError, match="more than max_num_patches_per_side=4"):
        im.flattened_position_ids(14 * 5, 14, 14, 4)
    with pytest.raises(ImageError, match="not a multiple of the patch size 14"):
        im.patchify(np.zeros((20, 28, 3), np.uint8), 14)


# --- any bytes: decoded to RGB or one ImageError with a skip reason -------------------------------------------------


def test_unusual_encodings_decode_to_the_right_rgb():
    from bad_data import good_images

    imgs = good_images()
    for name, data in imgs.items():
        out = im.decode_image(data, name)
        assert out.mode == "RGB" and min(out.size) >= 16, name
    px = lambda name: np.asarray(im.decode_image(imgs[name], name)).astype(int)  # noqa: E731
    gray16 = np.asarray(Image.open(io.BytesIO(imgs["gray16_png"]))).astype(np.float64)
    np.testing.assert_array_equal(px("gray16_png")[..., 0], np.rint(gray16 * 255 / 65535))  # scaled, not clipped
    assert px("gray16_png").max() >= 250 and 100 < px("gray16_png").mean() < 155  # PIL convert: mostly 255
    la = px("la_png")
    assert (la[0, 0] == 255).all() and (la[16, 16] == 20).all()  # transparent → white, opaque kept
    rotated = px("exif_rotated_jpeg")  # stored 40 wide x 24 high, left red / right blue; EXIF: turn 90° clockwise
    assert rotated.shape == (40, 24, 3)
    assert rotated[2, 12, 0] > 200 > rotated[2, 12, 2] and rotated[-3, 12, 2] > 200 > rotated[-3, 12, 0]
    assert (px("animated_gif")[5, 5] == (255, 0, 0)).all()  # the first frame
    np.testing.assert_allclose(px("float_tiff")[-1, -1], 255, atol=1)  # floats in [0, 1] scaled by 255


def test_bad_bytes_get_their_skip_reason():
    from bad_data import bad_images

    for name, (data, reason) in bad_images().items():
        with pytest.raises(ImageError) as e:
            im.decode_image(data, f"{name}.img")
        assert e.value.reason == reason, (name, str(e.value))
        assert str(e.value).startswith(f"{name}.img: ") and "\n" not in str(e.value)


def test_our_pixel_limit_is_checked_before_pils(monkeypatch):
    """PIL refuses images above 2x its MAX_IMAGE_PIXELS at open; an image under data.max_input_pixels must decode
    whatever PIL's limit was, one over it must be image_too_large from our check (header size, nothing decoded)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL alone: warns above 1000, refuses above 2000
    ok = _png(Image.new("RGB", (60, 50)))  # 3000 px
    assert im.decode_image(ok, "ok.png", max_input_pixels=5000).size == (60, 50)
    assert Image.MAX_IMAGE_PIXELS >= 5000
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError, match=r"big.png: 100x100 = 10000 pixels exceeds the limit max_input_pixels=5000"):
        im.decode_image(_png(Image.new("RGB", (100, 100))), "big.png", max_input_pixels=5000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError) as e:  # far beyond both limits: PIL's error, counted as ours
        im.decode_image(_png(Image.new("RGB", (300, 300))), "huge.png", max_input_pixels=5000)
    assert e.value.reason == "image_too_large" and "max_input_pixels=5000" in str(e.value)


def test_mutated_image_bytes_never_raise_anything_else():
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from bad_data import good_images
    from bagel_jax.data.skips import SKIP_REASONS

    seeds = list(good_images().values())

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(
        st.sampled_from(seeds), st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=6), st.floats(0, 1)
    )
    def check(data, edits, keep):
        b = bytearray(data[: max(1, int(len(data) * keep))] if keep < 0.5 else data)
        for where, value in edits:
            b[min(int(where * len(b)), len(b) - 1)] = value
        try:
            out = im.decode_image(bytes(b), "fuzz.png", max_input_pixels=1 << 20)
        except ImageError as e:
            assert e.reason in SKIP_REASONS and "\n" not in str(e)
        else:
            assert out.mode == "RGB" and out.size[0] * out.size[1] <= 1 << 20

    check()
