"""The Shapes dataset: exact palette and geometry, captions, determinism, the TFDS builder."""
import numpy as np
import pytest

from unclip_jax import cli
from unclip_jax.data import shapes


def test_palette_background_and_exact_interior():
    assert shapes.BACKGROUND == (240, 240, 240)
    assert shapes.COLOURS == {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220),
                              "yellow": (235, 200, 20), "purple": (150, 50, 190),
                              "cyan": (20, 190, 200)}
    obj = shapes.Obj("blue", "square", "large", 0.5, 0.5, 0.4)
    img = shapes.render(shapes.Scene((obj,), shapes.caption_for((obj,))))
    assert img.shape == (128, 128, 3) and img.dtype == np.uint8
    assert (img[0, 0] == (240, 240, 240)).all() and (img[64, 64] == (30, 70, 220)).all()
    # Square 0.4 x 128 = 51.2 px centred at 64: columns 38..89 are covered, 39..88 fully.
    exact = (img == (30, 70, 220)).all(-1)
    assert exact[64].sum() == 50 and exact[:, 64].sum() == 50


@pytest.mark.parametrize("shape,fill", [("circle", np.pi / 4), ("square", 1.0), ("triangle", 0.5)])
def test_shape_areas_and_triangle_points_up(shape, fill):
    obj = shapes.Obj("red", shape, "large", 0.5, 0.5, 0.4)
    img = shapes.render(shapes.Scene((obj,), shapes.caption_for((obj,)))).astype(float)
    coverage = (240 - img[..., 1]) / (240 - 30)          # green channel: background -> red
    area = coverage.sum() / 128 ** 2
    assert abs(area - fill * 0.4 ** 2) < 0.002
    rows = coverage.sum(1)
    if shape == "triangle":  # widest at the bottom of its box
        assert rows[80] > 2 * rows[50]


def test_smaller_renders_are_area_downsamples():
    _, scene = shapes.example(0, "train", 3)
    full = shapes.render(scene).astype(float)
    for size in (64, 32):
        k = 128 // size
        want = np.round(full.reshape(size, k, size, k, 3).mean((1, 3)))
        assert np.array_equal(shapes.render(scene, size), want.astype(np.uint8))


def test_deterministic_per_index_and_split():
    a, _ = shapes.example(7, "train", 5)
    images, scenes = shapes.generate(7, "train", 3, start=4)
    assert np.array_equal(images[1], a)
    assert scenes[1] == shapes.example(7, "train", 5).scene
    assert shapes.example(7, "test", 5).scene != scenes[1]
    assert shapes.example(8, "train", 5).scene != scenes[1]


def test_caption_enumeration_and_parsing():
    caps = shapes.all_captions()
    assert len(caps) == len(set(caps)) == 2 * 6 * 3 * 9 + 6 * 3 * 5 * 3 * 4
    assert "a small red circle in the center" in caps
    assert "a large cyan triangle at the bottom left" in caps
    assert "a red circle to the left of a blue square" in caps
    assert "a red circle above a red square" not in caps  # colours differ
    p = shapes.parse_caption("a red circle below a blue square")
    assert p.objects == (("red", "circle"), ("blue", "square")) and p.relation == "below"
    p = shapes.parse_caption("A large green square in the center.")
    assert (p.size, p.position, p.objects) == ("large", "center", (("green", "square"),))
    with pytest.raises(shapes.CaptionParseError, match="not a Shapes caption"):
        shapes.parse_caption("a dog on a sofa")


def test_sampled_scenes_follow_the_rules():
    caps = set(shapes.all_captions())
    kinds = []
    for i in range(400):
        _, s = shapes.example(0, "train", i) if i < 20 else (None, shapes.sample_scene(
            shapes.scene_rng(0, "train", i)))
        kinds.append(s.kind)
        assert s.caption in caps and shapes.parse_caption(s.caption).kind == s.kind
        for o in s.objects:
            assert o.side == shapes.SIZES[o.size]
            assert o.side / 2 <= min(o.cx, o.cy) and max(o.cx, o.cy) <= 1 - o.side / 2
        if s.kind == "one":
            o = s.objects[0]
            assert s.relation is None and s.position == shapes.position_of(o.cx, o.cy)
            col, row = round(o.cx * 3 - 0.5), round(o.cy * 3 - 0.5)
            cell = np.array([(col + 0.5) / 3, (row + 0.5) / 3])
            assert np.abs(np.array([o.cx, o.cy]) - cell).max() <= 0.04 + 0.05  # jitter (+clamp)
        else:
            a, b = s.objects
            assert a.size == b.size == "small" and a.colour != b.colour
            dx, dy = b.cx - a.cx, b.cy - a.cy
            main, perp = {"to the left of": (dx, dy), "to the right of": (-dx, dy),
                          "above": (dy, dx), "below": (-dy, dx)}[s.relation]
            assert main >= 0.25 and abs(perp) <= main - 0.08
            assert max(abs(dx), abs(dy)) >= a.side + 0.05      # boxes never overlap
    assert 0.4 < kinds.count("one") / len(kinds) < 0.6


def test_tfds_builder_configs_and_cli_build(tmp_path, capsys):
    import tensorflow_datasets as tfds

    from unclip_jax.data import shapes_builder as sb
    b = tfds.builder("shapes/tiny", data_dir=str(tmp_path))
    assert (b.builder_config.num_train, b.builder_config.num_test) == (64, 32)
    d = tfds.builder("shapes", data_dir=str(tmp_path)).builder_config
    assert (d.name, d.num_train, d.num_test) == ("default", 50_000, 2_000)

    rc = cli.main(["shapes", "--data-dir", str(tmp_path), "--config", "tiny", "--num-train", "6",
                   "--num-test", "3", "--seed", "5"])
    assert rc == 0 and "shapes/n6-3-s5" in capsys.readouterr().out
    ds = tfds.load("shapes", split="train", data_dir=str(tmp_path), download=False,
                   builder_kwargs=dict(config=sb.make_config(6, 3, seed=5)))
    records = list(tfds.as_numpy(ds))
    assert sorted(r["index"] for r in records) == list(range(6))
    for r in records:
        image, scene = shapes.example(5, "train", int(r["index"]))
        assert np.array_equal(r["image"], image)
        assert r["caption"].decode() == scene.caption
        assert r["num_objects"] == len(scene.objects)
        assert r["relation"].decode() == (scene.relation or "")
        assert [c.decode() for c in r["objects"]["colour"]] == [o.colour for o in scene.objects]
        np.testing.assert_allclose(r["objects"]["cx"], [o.cx for o in scene.objects], rtol=1e-6)
    assert ds.cardinality() == 6

    with pytest.raises(SystemExit) as e:   # refused by the parser, before any work
        cli.main(["shapes", "--data-dir", str(tmp_path), "--num-train", "-1"])
    assert e.value.code == 2 and "--num-train" in capsys.readouterr().err


def test_hard_negative_0_exchanges_the_two_objects():
    assert shapes.hard_negative("a red circle above a blue square", 0) == \
        "a blue square above a red circle"
    assert shapes.hard_negative("A green triangle to the left of a cyan circle.", 0) == \
        "a cyan circle to the left of a green triangle"
    for caption in shapes.two_object_captions()[:50]:
        swapped = shapes.hard_negative(caption, 0)
        assert swapped != caption and shapes.hard_negative(swapped, 0) == caption
    assert shapes.hard_negative("a small red circle at the top left", 0) is None
    assert shapes.hard_negative("a red frog", 0) is None


def test_hard_negatives_are_other_scenes_built_from_the_same_parts():
    from unclip_jax.evaluate.clip_retrieval import scene_class
    cap = "a red circle above a blue square"
    assert [shapes.hard_negative(cap, v) for v in range(4)] == [
        "a blue square above a red circle", "a red circle to the right of a blue square",
        "a red square above a blue circle", "a blue square above a red circle"]
    # same shapes: the shape exchange would change nothing, so the relation turns the other way
    assert shapes.hard_negative("a red circle above a blue circle", 2) == \
        "a red circle to the left of a blue circle"
    for caption in shapes.two_object_captions()[::7]:
        for v in range(3):
            neg = shapes.hard_negative(caption, v)
            assert scene_class(neg) != scene_class(caption)     # never the same scene
    assert shapes.hard_negative("a small red circle at the top left", 1) is None
