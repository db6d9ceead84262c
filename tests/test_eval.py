"""bagel_jax.eval: the shape detector on rendered ground truth, and the three scorers with oracle and
adversarial generators/answerers/editors."""

import collections
import dataclasses
import json

import ml_collections
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from bagel_jax.config import ConfigError
from bagel_jax.data.builders import synthetic_shapes as shapes
from bagel_jax.eval import detector, edit, geneval, runner, vqa

Obj = shapes.Obj
COLORS = detector.COLOR_NAMES


def random_scene(rng) -> list[Obj]:
    cells = rng.choice(9, size=int(rng.integers(1, 4)), replace=False)
    return [Obj(shapes.SHAPES[rng.integers(3)], COLORS[rng.integers(len(COLORS))], int(c)) for c in cells]


def corrupt(img: Image.Image, rng, noise: float, blur: float) -> np.ndarray:
    if blur:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    arr = np.asarray(img, np.float32)
    if noise:
        arr = arr + rng.normal(0.0, noise, arr.shape)
    return np.clip(np.round(arr), 0, 255).astype(np.uint8)


# --- detector ---------------------------------------------------------------------------------------


def bfs_components(mask: np.ndarray, connectivity: int) -> list[set]:
    """Slow oracle: connected components by breadth-first search."""
    steps = [(-1, 0), (1, 0), (0, -1), (0, 1)] + ([(-1, -1), (-1, 1), (1, -1), (1, 1)] if connectivity == 8 else [])
    seen, comps = np.zeros_like(mask, bool), []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        comp, queue = set(), collections.deque([(y, x)])
        seen[y, x] = True
        while queue:
            cy, cx = queue.popleft()
            comp.add((cy, cx))
            for dy, dx in steps:
                ny, nx = cy + dy, cx + dx
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        comps.append(comp)
    return comps


@pytest.mark.parametrize("connectivity", [4, 8])
def test_label_components_matches_bfs(connectivity):
    rng = np.random.default_rng(0)
    for trial in range(20):
        h, w = rng.integers(1, 40, size=2)
        mask = rng.random((h, w)) < rng.uniform(0.2, 0.7)
        labels, n = detector.label_components(mask, connectivity)
        want = bfs_components(mask, connectivity)
        got = [set(zip(*np.nonzero(labels == k))) for k in range(1, n + 1)]
        assert n == len(want) and sorted(map(sorted, got)) == sorted(map(sorted, want)), trial
        assert (labels > 0).sum() == mask.sum()
        firsts = [min(c) for c in got]  # numbered in raster order of first pixels
        assert firsts == sorted(firsts)


def test_label_components_serpentine_is_one():
    """A winding path (geodesic length ≫ image side) is still one component."""
    mask = np.zeros((31, 31), bool)
    mask[::2] = True
    for r in range(1, 31, 2):
        mask[r, 30 if (r // 2) % 2 == 0 else 0] = True
    labels, n = detector.label_components(mask, 4)
    assert n == 1 and (labels == 1).sum() == mask.sum()
    mask[15, :] = False  # cut it in two
    assert detector.label_components(mask, 4)[1] == len(bfs_components(mask, 4)) == 2


@pytest.mark.parametrize("sigma", [0.4, 1.0, 2.0])
def test_gaussian_blur_matches_dense_convolution(sigma):
    rng = np.random.default_rng(0)
    a = rng.random((9, 14))
    r = int(np.ceil(3 * sigma))
    want = np.zeros_like(a)
    for y in range(9):
        for x in range(14):
            for v in range(max(0, y - r), min(9, y + r + 1)):
                for u in range(max(0, x - r), min(14, x + r + 1)):
                    d2 = (y - v) ** 2 + (x - u) ** 2
                    want[y, x] += a[v, u] * np.exp(-d2 / (2 * sigma**2)) / (2 * np.pi * sigma**2)
    np.testing.assert_allclose(detector.gaussian_blur(a, sigma), want, rtol=1e-10, atol=1e-12)
    assert detector.gaussian_blur(a, 0.0) is a


def test_template_matches_renderer_geometry():
    """The fitting templates are the renderer's shapes: same box centre, size, orientation."""
    w = h = 300
    for shape in shapes.SHAPES:
        for cell in (0, 4, 8):
            drawn = np.asarray(shapes.render([Obj(shape, "red", cell)], w, h), np.float32)
            mask = np.linalg.norm(drawn - detector.BACKGROUND, axis=-1) > detector.FOREGROUND_THRESHOLD
            r, c = divmod(cell, 3)
            cy, cx, half = (r + 0.5) * h / 3, (c + 0.5) * w / 3, 0.32 * min(w, h) / 3
            # PIL draws the box [c - half, c + half] pixel-inclusive: half a pixel more on each side
            t = detector.shape_template(shape, cy, cx, half + 0.5, (0, 0, h, w)) > 0.5
            iou = (t & mask).sum() / (t | mask).sum()
            assert iou > 0.99, (shape, cell, iou)


def test_template_fit_on_large_render_recovers_geometry():
    for shape in shapes.SHAPES:
        dets = detector.detect(shapes.render([Obj(shape, "blue", 5)], 240, 180))
        assert [d.obj() for d in dets] == [Obj(shape, "blue", 5)]
        d = dets[0]
        np.testing.assert_allclose(d.center, (0.5, 5 / 6), atol=0.01)
        assert d.blur == 0.0 and d.fit_error < 0.05 and d.color_distance == 0.0


CONDITIONS = {"clean": (0, 0), "noise8": (8, 0), "blur1": (0, 1.0), "noise8_blur0.8": (8, 0.8)}


@pytest.mark.parametrize("condition", list(CONDITIONS))
def test_detector_accuracy_on_rendered_scenes(condition):
    """≥ 99% of random scenes (48–96 px, 1–3 shapes) are recovered exactly (every shape, colour, cell)."""
    noise, blur = CONDITIONS[condition]
    rng = np.random.default_rng(list(CONDITIONS).index(condition))
    n, exact, objects, objects_ok = 100, 0, 0, 0
    for _ in range(n):
        objs = random_scene(rng)
        w, h = (int(v) for v in rng.integers(48, 97, size=2))
        got = detector.detect_objects(corrupt(shapes.render(objs, w, h), rng, noise, blur))
        exact += got == detector.sort_objs(objs)
        objects += len(objs)
        objects_ok += sum((collections.Counter(got) & collections.Counter(objs)).values())
    print(f"detector {condition}: scenes {exact}/{n}, objects {objects_ok}/{objects}")
    assert exact / n >= 0.99


def test_detector_input_formats_and_rejects():
    objs = [Obj("triangle", "orange", 2), Obj("square", "purple", 6)]
    img = shapes.render(objs, 80, 72)
    arr = np.asarray(img)
    want = detector.sort_objs(objs)
    assert detector.detect_objects(img) == want
    assert detector.detect_objects(arr) == want
    assert detector.detect_objects(arr.astype(np.float32) / 255.0) == want
    assert detector.detect_objects(np.asarray(shapes.render([], 64, 64))) == []
    with pytest.raises(ValueError, match="image"):
        detector.detect(arr[..., :2])
    with pytest.raises(ValueError, match="image"):
        detector.detect(arr.astype(np.int32))
    # Lines, rings and merged shapes are none of the shapes: not reported.
    for draw_fn in (
        lambda d: d.line([5, 5, 58, 40], fill=(40, 80, 220), width=3),
        lambda d: d.ellipse([10, 10, 54, 54], outline=(40, 170, 60), width=4),
        lambda d: (d.ellipse([8, 8, 30, 30], fill=(220, 40, 40)), d.rectangle([22, 22, 46, 46], fill=(220, 40, 40))),
    ):
        junk = Image.new("RGB", (64, 64), tuple(int(v) for v in detector.BACKGROUND))
        draw_fn(ImageDraw.Draw(junk))
        assert detector.detect(junk) == []
    # Specks below min_area_frac are ignored.
    speck = arr.copy()
    speck[1:3, 40:42] = shapes.COLORS["red"]
    assert detector.detect_objects(speck) == want


# --- shapes-GenEval ---------------------------------------------------------------------------------


def _shift_color(o: Obj) -> Obj:
    return Obj(o.shape, COLORS[(COLORS.index(o.color) + 1) % len(COLORS)], o.cell)


def _free_cells(objs):
    return [c for c in range(9) if c not in {o.cell for o in objs}]


@pytest.fixture(scope="module")
def gen_eval():
    return geneval.ShapesGenEval(num_examples=10, seed=3)


def _render(ex, objs):
    return np.asarray(shapes.render(list(objs), ex.width, ex.height))


def test_geneval_prompts(gen_eval):
    cats = collections.Counter(e.category for e in gen_eval.examples)
    assert cats == {c: 10 for c in geneval.CATEGORIES}
    for e in gen_eval.examples:
        assert e.prompt in shapes.describe(list(e.objects))  # the builder's captions
        assert e.correct(list(e.objects))
    again = geneval.ShapesGenEval(num_examples=10, seed=3)
    assert again.prompts == gen_eval.prompts
    assert geneval.ShapesGenEval(num_examples=10, seed=4).prompts != gen_eval.prompts
    # exclude: the prompts of seed 3 are never drawn again
    other = geneval.ShapesGenEval(num_examples=10, seed=3, exclude=gen_eval.prompts)
    assert not set(other.prompts) & set(gen_eval.prompts)
    with pytest.raises(ValueError, match="num_examples"):
        geneval.ShapesGenEval(num_examples=0)
    with pytest.raises(ValueError, match="exclude"):  # only 18 single-object count captions exist
        geneval.make_examples(
            1, categories=["colors"], exclude=[f"An image with one {c} {s}." for c in COLORS for s in shapes.SHAPES]
        )


def test_geneval_oracle_scores_one(gen_eval):
    fns = runner.ground_truth_fns(None, {"g": runner.Scheduled("g", "shapes_geneval", gen_eval, 0)})
    scores = gen_eval.run(fns["generate_fn"])
    assert scores == {**{c: 1.0 for c in geneval.CATEGORIES}, "overall": 1.0}


def test_geneval_samples_get_their_own_seeds():
    """Every image of a run gets its own sampling seed (not one shared key), stable when more examples are drawn,
    and a category's accuracy is the mean over all of its images (GenEval's 4 images per prompt)."""
    ev = geneval.ShapesGenEval(num_examples=3, seed=5, samples_per_prompt=4)
    assert len(ev.samples) == 3 * 6 * 4
    assert [e for e, _ in ev.samples[::4]] == ev.examples
    seeds = [s for _, s in ev.samples]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**31 for s in seeds)
    bigger = geneval.ShapesGenEval(num_examples=5, seed=5, samples_per_prompt=4)
    assert set(seeds) < {s for _, s in bigger.samples}
    assert not set(seeds) & {s for _, s in geneval.ShapesGenEval(num_examples=3, seed=6, samples_per_prompt=4).samples}

    calls = []

    def right_for_the_first_sample(prompt, seed):  # the second..fourth image of each prompt is blank
        calls.append((prompt, seed))
        e = next(e for e, s in ev.samples if s == seed)
        return _render(e, e.objects if (len(calls) - 1) % 4 == 0 else [])

    s = ev.run(right_for_the_first_sample)
    assert calls == [(e.prompt, seed) for e, seed in ev.samples]
    assert s == {**{c: 0.25 for c in geneval.CATEGORIES}, "overall": 0.25}
    with pytest.raises(ValueError, match="samples_per_prompt"):
        geneval.ShapesGenEval(num_examples=1, samples_per_prompt=0)
    with pytest.raises(ValueError, match="one per sample"):
        ev.score([np.zeros((8, 8, 3), np.uint8)] * len(ev.examples))


def test_geneval_adversaries_fail_their_category(gen_eval):
    exs = gen_eval.examples

    def score(perturb):
        return gen_eval.score([_render(e, perturb(e)) for e in exs])

    # wrong colours: every object recoloured → colour categories fail, the rest still pass
    s = score(lambda e: [_shift_color(o) for o in e.objects])
    assert s["colors"] == s["color_attr"] == 0.0
    assert all(s[c] == 1.0 for c in ("single_object", "two_object", "counting", "position"))
    # colours swapped between the two shapes → only attribute binding fails
    s = score(
        lambda e: (
            [Obj(o.shape, e.objects[1 - i].color, o.cell) for i, o in enumerate(e.objects)]
            if e.category == "color_attr"
            else e.objects
        )
    )
    assert s["color_attr"] == 0.0 and s["colors"] == 1.0

    # wrong count: one more shape of the counted kind
    def more(e):
        if e.category != "counting":
            return e.objects
        return list(e.objects) + [Obj(e.objects[0].shape, e.objects[0].color, _free_cells(e.objects)[0])]

    s = score(more)
    assert s["counting"] == 0.0 and all(s[c] == 1.0 for c in geneval.CATEGORIES if c != "counting")
    s = score(lambda e: e.objects[:-1] if e.category == "counting" else e.objects)  # one fewer
    assert s["counting"] == 0.0

    # wrong positions: every object moved to another free cell → position fails, nothing else
    def moved(e):
        free = _free_cells(e.objects)
        return [Obj(o.shape, o.color, free[i]) for i, o in enumerate(e.objects)]

    s = score(moved)
    assert s["position"] == 0.0 and all(s[c] == 1.0 for c in geneval.CATEGORIES if c != "position")

    # wrong shapes → object categories fail
    s = score(
        lambda e: [Obj(shapes.SHAPES[(shapes.SHAPES.index(o.shape) + 1) % 3], o.color, o.cell) for o in e.objects]
    )
    assert s["single_object"] == s["two_object"] == s["colors"] == s["color_attr"] == 0.0

    # one object more than the prompt describes (a shape the prompt does not name) → every category fails
    def extra(e):
        free = _free_cells(e.objects)[0]
        named = {o.shape for o in e.objects}
        other = next(sh for sh in shapes.SHAPES if sh not in named)
        return list(e.objects) + [Obj(other, e.objects[0].color, free)]

    s = score(extra)
    assert s == {**{c: 0.0 for c in geneval.CATEGORIES}, "overall": 0.0}
    lenient = geneval.ShapesGenEval(num_examples=10, seed=3, no_extras=False)  # GenEval's own rules
    s = lenient.score([_render(e, extra(e)) for e in lenient.examples])
    assert all(s[c] == 1.0 for c in geneval.CATEGORIES)  # counting ignores other shapes, as in GenEval
    # blank images score zero, and overall is the mean of the categories
    s = gen_eval.score([_render(e, []) for e in exs])
    assert s == {**{c: 0.0 for c in geneval.CATEGORIES}, "overall": 0.0}
    half = [_render(e, e.objects if i % 2 else []) for i, e in enumerate(exs)]
    s = gen_eval.score(half)
    assert s["overall"] == pytest.approx(np.mean([s[c] for c in geneval.CATEGORIES]))


def test_geneval_requirements():
    r = geneval.Requirement("circle", count=2, exact=True)
    two = [Obj("circle", "red", 0), Obj("circle", "blue", 1)]
    assert r.holds(two) and not r.holds(two[:1]) and not r.holds(two + [Obj("circle", "red", 2)])
    assert r.holds(two + [Obj("square", "red", 2)])
    assert geneval.Requirement("square", color="red", cell=4).holds([Obj("square", "red", 4)])
    assert not geneval.Requirement("square", color="red", cell=4).holds([Obj("square", "red", 5)])


# --- shapes-VQA -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vqa_eval():
    return vqa.ShapesVQA(num_examples=60, seed=5)


def test_vqa_phrasing_and_ground_truth(vqa_eval):
    corpus = set(shapes.corpus())
    for e in vqa_eval.examples:
        assert e.question in corpus and e.answer in corpus, e
    kinds = collections.Counter(e.kind for e in vqa_eval.examples)
    assert kinds == {"count": 20, "color": 20, "position": 20}
    # the reference answers agree with what the detector reads off the rendered image
    for e in vqa_eval.examples:
        seen = detector.detect_objects(e.render())
        if e.kind == "count":
            shape = e.question.split()[2][:-1]
            assert e.answer.split()[2] == shapes.NUMBERS[sum(o.shape == shape for o in seen)]
        elif e.kind == "color":
            assert any(
                e.answer == f"It is {o.color}."
                and e.question == f"What colour is the {o.shape} {shapes._where(o.cell)}?"
                for o in seen
            )
        else:
            assert any(
                e.question == f"Where is the {o.color} {o.shape}?" and e.answer == f"It is {shapes._where(o.cell)}."
                for o in seen
            )


def test_vqa_exact_match(vqa_eval):
    exs = vqa_eval.examples
    fns = runner.ground_truth_fns(None, {"v": runner.Scheduled("v", "shapes_vqa", vqa_eval, 0)})
    assert vqa_eval.run(fns["answer_fn"]) == {"count": 1.0, "color": 1.0, "position": 1.0, "overall": 1.0}
    # case, spacing and the final full stop do not matter; bare answers count
    assert vqa_eval.score(["  " + e.answer.upper().rstrip(".") + " " for e in exs])["overall"] == 1.0
    assert vqa_eval.score([e.accepted[-1] for e in exs])["overall"] == 1.0

    # a wrong colour / count / place fails its kind only
    def wrong(e):
        if e.kind == "color":
            return "It is " + ("red" if "red" not in e.answer else "blue") + "."
        return e.answer

    s = vqa_eval.score([wrong(e) for e in exs])
    assert s["color"] == 0.0 and s["count"] == s["position"] == 1.0 and s["overall"] == pytest.approx(2 / 3)
    s = vqa_eval.score(
        ["There are three circles" if e.kind == "count" and "three" not in e.answer else e.answer for e in exs]
    )
    assert s["count"] < 1.0 and s["color"] == 1.0
    assert vqa_eval.score(["It is at the top left and more." for _ in exs])["overall"] == 0.0
    with pytest.raises(TypeError, match="answer_fn"):
        vqa_eval.score([None] * len(exs))
    with pytest.raises(ValueError, match="predictions"):
        vqa_eval.score(["x"])


# --- shapes-edit ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def edit_eval():
    return edit.ShapesEdit(num_examples=40, seed=7)


def test_edit_examples(edit_eval):
    corpus = set(shapes.corpus())
    assert collections.Counter(e.op for e in edit_eval.examples) == {op: 10 for op in edit.OPS}
    for e in edit_eval.examples:
        assert e.instruction in corpus, e.instruction
        s, t = collections.Counter(e.source), collections.Counter(e.target)
        assert e.judge(e.target) == (True, True) and e.judge(e.source) == (False, True)
        if e.op == "add":
            assert len(t - s) == 1 and not s - t
        elif e.op == "remove":
            assert len(s - t) == 1 and not t - s
        else:
            (new,), (old,) = t - s, s - t
            assert new.shape == old.shape
            changed = (new.color != old.color, new.cell != old.cell)
            assert changed == ((True, False) if e.op == "recolor" else (False, True))


def test_edit_scoring(edit_eval):
    exs = edit_eval.examples
    fns = runner.ground_truth_fns(None, {"e": runner.Scheduled("e", "shapes_edit", edit_eval, 0)})
    perfect = edit_eval.run(fns["edit_fn"])
    unedited, blank = perfect.pop("edit_l1_unedited"), perfect.pop("edit_l1_blank")
    assert perfect == {
        "edit_success": 1.0,
        "preservation": 1.0,
        "overall": 1.0,
        **{op: 1.0 for op in edit.OPS},
        "edit_l1": 0.0,
        "rest_l1": 0.0,
    }
    seen = []
    edit_eval.run(lambda image, instruction, seed: seen.append(seed) or image)
    assert seen == edit_eval.seeds and len(set(seen)) == len(exs)  # each edit samples its own noise
    # doing nothing preserves everything and edits nothing
    s = edit_eval.run(lambda image, instruction, seed: image)
    assert s["edit_success"] == 0.0 and s["preservation"] == 1.0 and s["overall"] == 0.0
    assert s["rest_l1"] == 0.0 and s["edit_l1"] == s["edit_l1_unedited"] == unedited > 0.02
    # erasing everything: the removed shapes are right, the rest is lost
    s = edit_eval.run(lambda image, instruction, seed: np.asarray(shapes.render([], *image.shape[1::-1])))
    assert s["edit_l1"] == s["edit_l1_blank"] == blank > 0.02 and s["rest_l1"] > 0.01 and s["remove"] == 0.0

    def render(e, objs):
        return np.asarray(shapes.render(list(objs), e.width, e.height))

    # a recolour to the wrong colour fails only the edit of recolour examples
    def wrong_color(e):
        if e.op != "recolor":
            return e.target
        (new,) = collections.Counter(e.target) - collections.Counter(e.source)
        bad = [c for c in COLORS if c not in (new.color, dict((o.cell, o.color) for o in e.source)[new.cell])][0]
        return [Obj(o.shape, bad, o.cell) if o == new else o for o in e.target]

    s = edit_eval.score([render(e, wrong_color(e)) for e in exs])
    assert s["recolor"] == 0.0 and all(s[op] == 1.0 for op in ("move", "add", "remove")) and s["preservation"] == 1.0
    assert s["edit_success"] == pytest.approx(0.75)

    # the right edit, but another object also disappears → preservation fails where there was one
    def collateral(e):
        kept = collections.Counter(e.source) & collections.Counter(e.target)
        victim = next(iter(kept), None)
        return [o for o in e.target if o != victim]

    s = edit_eval.score([render(e, collateral(e)) for e in exs])
    has_kept = [bool(collections.Counter(e.source) & collections.Counter(e.target)) for e in exs]
    assert s["edit_success"] == 1.0 and s["preservation"] == pytest.approx(1 - np.mean(has_kept))
    # an extra object appears away from the edit → preservation fails everywhere
    s = edit_eval.score(
        [render(e, list(e.target) + [Obj("circle", "red", _free_cells(e.target + e.source)[0])]) for e in exs]
    )
    assert s["edit_success"] == 1.0 and s["preservation"] == 0.0
    # ... in the cell the edit touches: charged to the edit (e.g. a removed shape drawn in another colour)
    s = edit_eval.score(
        [
            render(e, [_shift_color(o) if o not in e.target else o for o in e.source] if e.op == "remove" else e.target)
            for e in exs
        ]
    )
    assert s["remove"] == 0.0 and s["edit_success"] == pytest.approx(0.75) and s["preservation"] == 1.0


def test_edit_l1_grades_every_edit(edit_eval):
    """The distance to the target: zero for the target at any output size, split between the touched cells and
    the rest, and ordered: the target < the unedited source < noise."""
    exs = edit_eval.examples
    at_48 = edit_eval.score([e.render("target", 48, 48) for e in exs])  # the model's output size, not the example's
    assert at_48["edit_l1"] == 0.0 and at_48["rest_l1"] == 0.0 and at_48["overall"] == 1.0
    e = next(e for e in exs if e.op == "move")
    (old,), (new,) = set(e.source) - set(e.target), set(e.target) - set(e.source)
    assert e.touched_cells() == {old.cell, new.cell}
    # blanking the touched cells costs only edit_l1; blanking another object's cell costs only rest_l1
    blank_touched = e.render("target", 90, 90).copy()
    row, col = np.arange(90)[:, None] * 3 // 90, np.arange(90)[None, :] * 3 // 90
    blank_touched[np.isin(row * 3 + col, list(e.touched_cells()))] = (245, 245, 240)
    assert e.l1(blank_touched)[0] > 0.01 and e.l1(blank_touched)[1] == 0.0
    kept = [o for o in e.target if o.cell not in e.touched_cells()]
    if kept:
        without = e.render("target", 90, 90).copy()
        without[row * 3 + col == kept[0].cell] = (245, 245, 240)
        assert e.l1(without)[0] == 0.0 and e.l1(without)[1] > 0.01
    rng = np.random.default_rng(0)
    noise = edit_eval.score([rng.integers(0, 256, (48, 48, 3), dtype=np.uint8) for _ in exs])
    assert noise["edit_l1"] > noise["edit_l1_unedited"] > 0 and noise["rest_l1"] > 0.2
    with pytest.raises(ValueError, match="image: expected"):
        e.l1(np.zeros((48, 48), np.uint8))


# --- runner -----------------------------------------------------------------------------------------


def small_evals():
    return ml_collections.ConfigDict(
        dict(
            gen=dict(type="shapes_geneval", num_examples=2, every=10, seed=1),
            vqa=dict(type="shapes_vqa", num_examples=6, every=5),
            edit=dict(type="shapes_edit", num_examples=4, every=0),
        )
    )


def test_runner_builds_and_schedules():
    evaluators = runner.build_evaluators(small_evals())
    assert {n: s.type for n, s in evaluators.items()} == {
        "gen": "shapes_geneval",
        "vqa": "shapes_vqa",
        "edit": "shapes_edit",
    }
    assert len(evaluators["gen"].evaluator.examples) == 12
    assert [s for s in range(1, 21) if evaluators["vqa"].due(s)] == [5, 10, 15, 20]
    assert not any(evaluators["edit"].due(s) for s in range(100))
    fns = runner.ground_truth_fns(None, evaluators)
    m = runner.run_evals(evaluators, step=5, answer_fn=fns["answer_fn"])  # only vqa is due: no other fn needed
    assert {k for k in m if not k.endswith("seconds")} == {"vqa/count", "vqa/color", "vqa/position", "vqa/overall"}
    m = runner.run_evals(evaluators, **fns)  # standalone: all
    distances = {"edit/edit_l1": 0.0, "edit/rest_l1": 0.0}
    assert {k: m[k] for k in distances} == distances and "edit/preservation" in m
    accuracies = {k: v for k, v in m.items() if not k.endswith(("seconds", "_l1", "_unedited", "_blank"))}
    assert {"gen/overall", "vqa/overall", "edit/overall"} <= set(accuracies)
    assert all(v == 1.0 for v in accuracies.values()), accuracies
    with pytest.raises(ValueError, match="evals.gen: shapes_geneval needs generate_fn"):
        runner.run_evals(evaluators, step=10, answer_fn=fns["answer_fn"])


@pytest.mark.parametrize(
    "entry, message",
    [
        (dict(type="nope"), r"evals.x.type: expected one of"),
        (dict(num_examples=3), r"evals.x.type"),
        (dict(type="shapes_vqa", every=-1), r"evals.x.every"),
        (dict(type="shapes_vqa", colour=1), r"evals.x.colour: unknown option for shapes_vqa"),
        (dict(type="shapes_edit", num_examples=0), r"evals.x.num_examples: must be >= 1"),
        (3, r"evals.x: expected a dict"),
    ],
)
def test_runner_config_errors(entry, message):
    with pytest.raises(ConfigError, match=message):
        runner.build_evaluators({"x": entry})
    if entry != dict(type="shapes_edit", num_examples=0):  # option names are checked without building
        with pytest.raises(ConfigError, match=message):
            runner.validate_evals({"x": entry})


def test_runner_cli(tmp_path):
    out = tmp_path / "metrics.json"
    config = tmp_path / "cfg.py"
    config.write_text(
        "import ml_collections\n"
        "def get_config():\n"
        "    return ml_collections.ConfigDict(dict(evals=dict(\n"
        "        g=dict(type='shapes_geneval', num_examples=1), v=dict(type='shapes_vqa', num_examples=3))))\n"
    )
    metrics = runner.main(
        ["runner", f"--config={config}", "--fns=bagel_jax.eval.runner:ground_truth_fns", "--only=v", f"--output={out}"]
    )
    assert json.loads(out.read_text()) == metrics
    assert set(metrics) == {"v/count", "v/color", "v/position", "v/overall", "v/seconds"}
    assert metrics["v/overall"] == 1.0
    with pytest.raises(ValueError, match="--fns"):
        runner.main(["runner", "--fns=bagel_jax.eval.runner"])
    with pytest.raises(ValueError, match="--only"):
        runner.main(["runner", f"--config={config}", "--fns=bagel_jax.eval.runner:ground_truth_fns", "--only=zz"])


@pytest.mark.parametrize("cls", [geneval.ShapesGenEval, vqa.ShapesVQA, edit.ShapesEdit])
def test_square_evaluators_change_only_the_canvas(cls):
    """``square=True`` (runs trained on square shapes) draws the same scenes and prompts on square canvases."""
    plain, square = cls(num_examples=6), cls(num_examples=6, square=True)
    for a, b in zip(plain.examples, square.examples):
        assert b.width == b.height == a.width
        assert dataclasses.replace(b, height=a.height) == a
