"""The exact Shapes judge: right on every ground-truth render, wrong for the right reason."""
import numpy as np
import pytest

from unclip_jax.data import shapes
from unclip_jax.errors import UserError
from unclip_jax.evaluate import shapes_judge as J

N_PER_KIND = 200


@pytest.fixture(scope="module")
def scenes():
    one = [shapes.sample_scene(shapes.scene_rng(1, "judge", i), "one") for i in range(N_PER_KIND)]
    two = [shapes.sample_scene(shapes.scene_rng(1, "judge", 10_000 + i), "two")
           for i in range(N_PER_KIND)]
    full = {id(s): shapes.render(s) for s in one + two}
    return one, two, full


def test_ground_truth_renders_are_judged_correct_at_128_64_32(scenes):
    one, two, full = scenes
    for size in (128, 64, 32):
        images = [shapes.area_downsample(full[id(s)], size) if size < 128 else full[id(s)]
                  for s in one + two]
        summary = J.judge_batch(images, [s.caption for s in one + two])
        assert summary["one/n"] == summary["two/n"] == N_PER_KIND
        bad = {k: v for k, v in summary.items() if not k.endswith("/n") and k != "n" and v != 1.0}
        assert not bad, (size, bad)


def test_found_geometry_matches_the_scene(scenes):
    one, two, full = scenes
    for s in one[:20] + two[:20]:
        found = sorted(J.find_objects(shapes.area_downsample(full[id(s)], 32)),
                       key=lambda r: r.colour)
        want = sorted(s.objects, key=lambda o: o.colour)
        assert [(r.colour, r.shape, r.size) for r in found] == [(o.colour, o.shape, o.size)
                                                                for o in want]
        for r, o in zip(found, want):
            assert abs(r.cx - o.cx) < 0.02 and abs(r.cy - o.cy) < 0.02


def _other(value, options):
    return next(v for v in options if v != value)


def test_wrong_one_object_captions_fail_the_right_part(scenes):
    one, _, full = scenes
    for s in one[:30]:
        image = shapes.area_downsample(full[id(s)], 64)
        o = s.objects[0]
        pos = s.position
        colour = _other(o.colour, shapes.COLOURS)
        size = _other(o.size, shapes.SIZES)
        shape = _other(o.shape, shapes.SHAPES)
        where = _other(pos, shapes.POSITION_NAMES)
        cases = {"colour": (o.size, colour, o.shape, pos),
                 "shape": (o.size, o.colour, shape, pos),
                 "size": (size, o.colour, o.shape, pos),
                 "position": (o.size, o.colour, o.shape, where)}
        for part, (sz, c, sh, p) in cases.items():
            caption = shapes._one_caption(sz, c, sh, p)
            j = J.judge(image, caption)
            assert not j.correct and j.failed == [part], (caption, s.caption, j.failed)


def test_wrong_two_object_captions_fail_the_right_part(scenes):
    _, two, full = scenes
    opposite = {"to the left of": "to the right of", "to the right of": "to the left of",
                "above": "below", "below": "above"}
    swapped_checked = 0
    for s in two[:40]:
        image = shapes.area_downsample(full[id(s)], 64)
        a, b = s.objects
        # Opposite relation: only the relation fails.
        j = J.judge(image, shapes._two_caption((a.colour, a.shape), opposite[s.relation],
                                               (b.colour, b.shape)))
        assert not j.correct and j.failed == ["relation"]
        # A colour that is not in the image: that object is not found and colours are missing.
        third = next(c for c in shapes.COLOURS if c not in (a.colour, b.colour))
        j = J.judge(image, shapes._two_caption((third, a.shape), s.relation, (b.colour, b.shape)))
        assert not j.correct and not j.first_found and j.second_found
        assert not j.colours_present and not j.binding
        if a.shape == b.shape:
            continue
        swapped_checked += 1
        # Shapes swapped between the colours: everything is present, but bound wrongly.
        j = J.judge(image, shapes._two_caption((a.colour, b.shape), s.relation,
                                               (b.colour, a.shape)))
        assert not j.correct and j.colours_present and j.shapes_present and j.relation
        assert not j.binding and not j.first_found and not j.second_found
        # Colours swapped between the shapes: also a binding failure.
        j = J.judge(image, shapes._two_caption((b.colour, a.shape), s.relation,
                                               (a.colour, b.shape)))
        assert not j.correct and j.colours_present and j.shapes_present and not j.binding
    assert swapped_checked >= 10


def test_binding_given_parts_in_the_summary(scenes):
    _, two, full = scenes
    pairs = [s for s in two if s.objects[0].shape != s.objects[1].shape][:6]
    images = [full[id(s)] for s in pairs]
    captions = [s.caption for s in pairs[:3]] + [
        shapes._two_caption((s.objects[0].colour, s.objects[1].shape), s.relation,
                            (s.objects[1].colour, s.objects[0].shape)) for s in pairs[3:]]
    summary = J.judge_batch(images, captions)
    assert summary["two/accuracy"] == 0.5 and summary["two/binding_given_parts"] == 0.5
    assert summary["two/colours_present"] == 1.0 and summary["two/relation"] == 1.0
    assert np.isnan(summary["one/accuracy"])


@pytest.mark.parametrize("size", [32, 64, 128])
def test_blank_and_noise_images_are_wrong(size):
    rng = np.random.default_rng(size)
    captions = shapes.all_captions()
    blank = np.full((size, size, 3), 240, np.uint8)
    noise = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    grey_noise = np.clip(240 + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
    for image in (blank, noise, grey_noise):
        for caption in (captions[5], captions[-7]):
            assert not J.judge(image, caption).correct
    assert J.find_objects(blank) == []


def test_mild_noise_and_float_images(scenes):
    one, two, full = scenes
    rng = np.random.default_rng(0)
    for s in one[:10] + two[:10]:
        image = shapes.area_downsample(full[id(s)], 64).astype(float)
        noisy = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
        assert J.judge(noisy, s.caption).correct
        assert J.judge(image / 127.5 - 1.0, s.caption).correct  # float in [-1, 1]


def test_bad_inputs_raise_user_errors():
    with pytest.raises(UserError, match="not a Shapes caption"):
        J.judge(np.zeros((64, 64, 3), np.uint8), "a cat")
    with pytest.raises(UserError, match="at least 32"):
        J.judge(np.zeros((16, 16, 3), np.uint8), "a red circle above a blue square")
    with pytest.raises(UserError, match=r"\[H, W, 3\]"):
        J.judge(np.zeros((64, 64), np.uint8), "a red circle above a blue square")
