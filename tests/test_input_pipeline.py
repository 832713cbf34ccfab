"""The trainer's input (unclip_jax/data/input_pipeline.py) and image handling (images.py):
malformed data flows through with exact counts, determinism, exact resume, crops, low_res."""
import os

import numpy as np
import pytest
import tensorflow as tf

from data_fixtures import (encode, image_array, png16_rgb, sample_records, write_shards,
                               write_tar)
from unclip_jax.data import images
from unclip_jax.data.input_pipeline import (COUNTERS, InputConfigError, default_input_config,
                                            make_input)


def _cfg(paths, **kw):
    cfg = dict(kind="webdataset", paths=[paths], image_size=8, context_length=0,
               shuffle_buffer=16, repeat=True)
    cfg.update(kw)
    return cfg


def _take(inp, n):
    return [next(inp) for _ in range(n)]


# ----------------------------------------------------------------------------- images.py

def test_decode_converts_modes_to_rgb_and_flags_them():
    rng = np.random.RandomState(0)
    rgb = image_array(1)
    alpha = np.zeros(rgb.shape[:2], np.uint8)
    alpha[:, 8:] = 255
    cases = {
        "rgba": (encode(np.dstack([rgb, alpha]), mode="RGBA"), images.FLAG_RGBA),
        "grey": (encode(rgb[..., 0], mode="L"), images.FLAG_GREYSCALE),
        "cmyk": (encode(np.dstack([rgb, alpha]), "JPEG", mode="CMYK", quality=100),
                 images.FLAG_CMYK),
        "png16": (png16_rgb(rng.randint(0, 65536, (4, 5, 3)).astype(np.uint16)),
                  images.FLAG_16BIT),
        "gif": (encode(rgb, "GIF"), 0),
        "webp": (encode(rgb, "WEBP", lossless=True), 0),
    }
    out = {k: images.decode_rgb(tf.constant(b)) for k, (b, _) in cases.items()}
    for k, (_, flag) in cases.items():
        assert out[k][0].shape[-1] == 3 and out[k][0].dtype == tf.uint8, k
        assert int(out[k][1]) == flag, k
    rgba = out["rgba"][0].numpy()
    assert (rgba[:, :8] == 255).all()                    # transparent -> white
    np.testing.assert_array_equal(rgba[:, 8:], rgb[:, 8:])  # opaque -> the colour
    grey = out["grey"][0].numpy()
    np.testing.assert_array_equal(grey, np.repeat(rgb[..., :1], 3, -1))
    from PIL import Image
    import io
    pil = np.asarray(Image.open(io.BytesIO(cases["cmyk"][0])).convert("RGB")).astype(int)
    assert np.abs(out["cmyk"][0].numpy().astype(int) - pil).mean() < 3
    np.testing.assert_array_equal(out["webp"][0].numpy(), rgb)
    with pytest.raises(tf.errors.InvalidArgumentError):
        images.decode_rgb(tf.constant(b"not an image at all"))


def test_16bit_png_is_rounded_to_8_bits():
    a16 = np.array([[[0, 257, 65535], [128, 32896, 65407]]], np.uint16)
    img, flags = images.decode_rgb(tf.constant(png16_rgb(a16)))
    np.testing.assert_array_equal(img.numpy(), np.round(a16 / 257.0).astype(np.uint8))
    assert int(flags) == images.FLAG_16BIT


def test_center_and_random_crops():
    img = np.zeros((10, 30, 3), np.uint8)
    img[:, 10:20] = 255                                   # white centre square
    centre = images.square_crop_resize(tf.constant(img), 5, "center", method="area").numpy()
    assert centre.shape == (5, 5, 3) and centre.dtype == np.float32
    np.testing.assert_allclose(centre, 1.0)               # exactly the white square, in [-1, 1]
    crops = [images.square_crop_resize(tf.constant(img), 5, "random", seed=tf.constant([s, 0]),
                                       method="area").numpy() for s in range(8)]
    assert all(c.shape == (5, 5, 3) and c.min() >= -1 and c.max() <= 1 for c in crops)
    means = {round(float(c.mean()), 4) for c in crops}
    assert len(means) > 2                                 # different offsets
    again = images.square_crop_resize(tf.constant(img), 5, "random", seed=tf.constant([3, 0]),
                                      method="area").numpy()
    np.testing.assert_array_equal(again, crops[3])        # same seed, same crop


# ----------------------------------------------------------------------------- malformed data

def _malformed_shards(d):
    """One tar with good and bad records, one truncated tar. Returns the kept keys."""
    rgb = image_array(5)
    alpha = np.full(rgb.shape[:2], 255, np.uint8)
    alpha[0, 0] = 0
    good = sample_records(4, prefix="good")
    members = []
    for key, png, caption, _ in good:
        members += [(f"{key}.png", png), (f"{key}.txt", caption.encode())]
    bad = [
        ("undecodable", "x.jpg", b"\xff\xd8\xff garbage that is no JPEG", "a caption"),
        ("empty", "x.png", encode(rgb), "   \n "),
        ("rgba", "x.png", encode(np.dstack([rgb, alpha]), mode="RGBA"), "an rgba image"),
        ("grey", "x.png", encode(rgb[..., 1], mode="L"), "a grey image"),
        ("png16", "x.png", png16_rgb(rgb.astype(np.uint16) * 257), "a 16-bit image"),
        ("cmyk", "x.jpg", encode(np.dstack([rgb, alpha]), "JPEG", mode="CMYK"), "cmyk"),
        ("long", "x.png", encode(rgb), "word " * 2000),          # 10,000 characters
        ("small", "x.png", encode(rgb[:4, :4]), "a tiny image"),
    ]
    for key, name, data, caption in bad:
        members += [(f"{key}.{name.split('.')[1]}", data), (f"{key}.txt", caption.encode())]
    members.append(("nocaption.png", encode(rgb)))
    write_tar(os.path.join(d, "a.tar"), members)
    more = sample_records(3, prefix="more")
    members = []
    for key, png, caption, _ in more:
        members += [(f"{key}.png", png), (f"{key}.txt", caption.encode())]
    write_tar(os.path.join(d, "b.tar"), members)
    data = open(os.path.join(d, "b.tar"), "rb").read()
    cut = data.index(b"more000002.png") + 600                 # inside the last image
    open(os.path.join(d, "b.tar"), "wb").write(data[:cut])
    return sorted([k for k, *_ in good] + ["rgba", "grey", "png16", "cmyk", "long",
                                           "more000000", "more000001"])


def test_malformed_batch_flows_through_with_exact_counts(tmp_path):
    kept = _malformed_shards(tmp_path)
    inp = make_input(_cfg(str(tmp_path / "*.tar"), repeat=False, context_length=16,
                          min_image_size=8), global_batch_size=2, seed=0, process_index=0,
                     process_count=1)
    batches = list(inp)
    keys = sorted(k for b in batches for k in b["key"])
    assert len(batches) == 5 and len(keys) == 10              # 11 kept, batches of 2
    assert set(keys) <= set(kept) and len(set(keys)) == 10
    counts = inp.counts()
    expected = dict.fromkeys(COUNTERS, 0)
    expected.update(read=15, kept=11, undecodable=1, empty_caption=1, too_small=1,
                    missing_caption=1, truncated_shard=1, converted_rgba=1,
                    converted_greyscale=1, converted_cmyk=1, converted_16bit=1,
                    caption_truncated=1, dropped_remainder=1)
    assert counts == expected
    for b in batches:
        assert b["image"].shape == (2, 8, 8, 3) and b["image"].dtype == np.float32
        assert b["image"].min() >= -1 and b["image"].max() <= 1
        assert b["text_tokens"].shape == (2, 16) and b["text_tokens"].dtype == np.int32
        assert b["text_mask"].dtype == bool
        for key, caption, mask in zip(b["key"], b["caption"], b["text_mask"]):
            if key == "long":
                assert mask.all() and len(caption) == len(("word " * 2000).strip())
            else:
                assert not mask.all() and isinstance(caption, str) and caption


def test_long_captions_can_be_skipped(tmp_path):
    _malformed_shards(tmp_path)
    inp = make_input(_cfg(str(tmp_path / "a.tar"), repeat=False, context_length=16,
                          long_caption="skip"), global_batch_size=1, seed=0, process_index=0,
                     process_count=1)
    keys = {b["key"][0] for b in inp}
    assert "long" not in keys and "small" in keys
    c = inp.counts()
    assert c["caption_too_long"] == 1 and c["caption_truncated"] == 0 and c["kept"] == 9


# ----------------------------------------------------------------------------- order, resume

def test_same_seed_same_order_other_seed_other_order_and_exact_resume(tmp_path):
    write_shards(tmp_path, 3, 8)
    cfg = _cfg(str(tmp_path / "*.tar"), crop="random", low_res_size=4,
               low_res_degradation="bsr", context_length=8)
    run = lambda seed, start=0: make_input(cfg, global_batch_size=4, seed=seed, process_index=0,
                                           process_count=1, start_batch=start)
    first = run(0)
    a = _take(first, 8)                                      # 32 records: past one epoch
    assert first.position == 8
    b = _take(run(0), 8)
    c = _take(run(1), 2)
    for x, y in zip(a, b):
        for k in ("image", "low_res", "text_tokens"):
            np.testing.assert_array_equal(x[k], y[k])
        assert list(x["key"]) == list(y["key"])
    assert [list(x["key"]) for x in a[:2]] != [list(x["key"]) for x in c]
    assert a[0]["low_res"].shape == (4, 4, 4, 3) and a[0]["image"].shape == (4, 8, 8, 3)
    resumed = run(0, start=5)
    assert resumed.position == 5
    r = _take(resumed, 3)
    assert resumed.position == 8
    for x, y in zip(a[5:], r):
        assert list(x["key"]) == list(y["key"])
        for k in ("image", "low_res", "text_tokens", "text_mask"):
            np.testing.assert_array_equal(x[k], y[k])
    assert resumed.counts() == first.counts()
    assert first.counts()["read"] >= 32 and first.counts()["kept"] == first.counts()["read"]


def test_two_processes_get_disjoint_halves_of_one_process_set(tmp_path):
    write_shards(tmp_path, 4, 4)
    cfg = _cfg(str(tmp_path / "*.tar"), repeat=False)
    keys = lambda i, n, bs: [k for b in make_input(cfg, global_batch_size=bs, seed=1,
                                                   process_index=i, process_count=n)
                             for k in b["key"]]
    one = keys(0, 1, 2)
    halves = [keys(i, 2, 2) for i in range(2)]
    assert len(one) == 16 and not set(halves[0]) & set(halves[1])
    assert sorted(halves[0] + halves[1]) == sorted(one)


def test_bad_batch_size_and_config_are_user_errors(tmp_path):
    write_shards(tmp_path, 1, 2)
    with pytest.raises(InputConfigError, match="multiple of the number of processes"):
        make_input(_cfg(str(tmp_path / "*.tar")), global_batch_size=3, seed=0,
                   process_index=0, process_count=2)
    with pytest.raises(InputConfigError, match="Did you mean 'image_size'"):
        make_input({"image_sise": 3}, global_batch_size=2, seed=0, process_index=0,
                   process_count=1)
    cfg = default_input_config()
    assert cfg.context_length == 77 and cfg.repeat and cfg.long_caption == "truncate"


def test_hard_negative_captions_are_tokenized_beside_the_captions(tmp_path):
    from data_fixtures import write_tar
    from unclip_jax.clip.tokenizer import get_tokenizer
    caps = ["a red circle above a blue square", "a small red circle at the top left"]
    members = []
    for i, cap in enumerate(caps):
        members += [(f"k{i}.png", encode(image_array(i))), (f"k{i}.txt", cap.encode())]
    write_tar(str(tmp_path / "a.tar"), members)
    inp = make_input(_cfg(str(tmp_path / "a.tar"), repeat=False, context_length=16,
                          negative_captions="shapes", shuffle_buffer=0),
                     global_batch_size=2, seed=0, process_index=0, process_count=1)
    b = next(inp)
    assert b["negative_tokens"].shape == b["negative_mask"].shape == (2, 3, 16)
    tok = get_tokenizer(16)(["a blue square above a red circle",
                             "a red circle to the right of a blue square",
                             "a red square above a blue circle"])
    row = list(b["caption"]).index(caps[0])
    np.testing.assert_array_equal(b["negative_tokens"][row], np.asarray(tok.ids))
    np.testing.assert_array_equal(b["negative_mask"][row], np.asarray(tok.mask))
    assert not b["negative_mask"][1 - row].any()      # one object: no negative
    with pytest.raises(InputConfigError, match="negative_captions must be one of"):
        make_input(_cfg(str(tmp_path / "a.tar"), context_length=16, negative_captions="coco"),
                   global_batch_size=2, seed=0, process_index=0, process_count=1)
    with pytest.raises(InputConfigError, match="needs context_length"):
        make_input(_cfg(str(tmp_path / "a.tar"), negative_captions="shapes"),
                   global_batch_size=2, seed=0, process_index=0, process_count=1)
