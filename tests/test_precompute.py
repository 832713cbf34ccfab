"""The embedding pre-compute job: records read back equal what CLIP computes directly."""
import glob
import json
import os

import numpy as np
import pytest
from flax import nnx

from unclip_jax import cli, clip
from unclip_jax.convert import hf_clip
from unclip_jax.data import precompute as pc
from unclip_jax.data import shapes

N = 10


@pytest.fixture(scope="module")
def model():
    return clip.CLIP(clip.get_preset("tiny"), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def written(model, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("embeds"))
    # Batches of 3 regrouped into encoder batches of 4: the last one (2 examples) is padded.
    manifest = pc.precompute(model, pc.shapes_batches(0, "test", N, 3), out, batch_size=4,
                             with_hidden=True, image_size=32, examples_per_shard=4,
                             clip_source="tiny/random")
    return out, manifest


def test_shards_and_manifest(written):
    out, manifest = written
    assert sorted(os.listdir(out)) == ["embeds-00000-of-00003.tfrecord",
                                       "embeds-00001-of-00003.tfrecord",
                                       "embeds-00002-of-00003.tfrecord", "manifest.json"]
    with open(os.path.join(out, "manifest.json")) as f:
        on_disk = json.load(f)
    assert on_disk["count"] == N and on_disk["counts"] == [4, 4, 2]
    assert on_disk["dims"] == {"context_length": 77, "text_embed": 64, "image_embed": 64,
                               "text_hidden": [77, 64], "image_size": 32}
    assert set(on_disk["fields"]) == set(pc.ALL_FIELDS)
    assert on_disk["clip"]["source"] == "tiny/random" and on_disk["clip"]["config"]["embed_dim"] == 64
    assert pc.validate_shards(out)["good"] == N


def test_records_equal_direct_clip(written, model):
    out, _ = written
    stats = pc.ReadStats()
    records = list(pc.read_embeddings(out, stats=stats).as_numpy_iterator())
    assert len(records) == N and stats.good == N and stats.bad == 0
    images, scenes = shapes.generate(0, "test", N)
    tokens = clip.get_tokenizer(77)([s.caption for s in scenes])

    @nnx.jit
    def direct(m, ids, mask, images):  # jitted only to keep the test fast
        pixels = clip.preprocess_jax(images.astype(np.float32) / 127.5 - 1.0, image_size=32)
        return (*m.encode_text(ids, mask), m.encode_image(pixels))

    text_embed, hidden, image_embed = direct(model, tokens.ids, tokens.mask, images)
    stack = lambda key: np.stack([r[key] for r in records])
    assert [r["caption"].decode() for r in records] == [s.caption for s in scenes]
    assert np.array_equal(stack("text_tokens"), tokens.ids)
    assert np.array_equal(stack("text_mask"), tokens.mask) and stack("text_mask").dtype == bool
    np.testing.assert_allclose(stack("text_embed"), text_embed, atol=1e-5)
    np.testing.assert_allclose(stack("image_embed"), image_embed, atol=1e-5)
    np.testing.assert_allclose(stack("text_hidden"), hidden, atol=1e-5)
    want = np.stack([shapes.render(s, 32) for s in scenes]) / 127.5 - 1.0
    np.testing.assert_allclose(stack("image"), want, atol=1e-6)
    # A subset of the fields, and a glob of shards.
    sub = list(pc.read_embeddings(os.path.join(out, "embeds-0000[01]-*.tfrecord"),
                                  fields=["caption", "image_embed"]).as_numpy_iterator())
    assert len(sub) == 8 and set(sub[0]) == {"caption", "image_embed"}


def test_corrupt_and_invalid_records_are_counted_not_fatal(written, tmp_path):
    import tensorflow as tf
    src, manifest = written
    out = str(tmp_path / "copy")
    os.makedirs(out)
    for name in manifest["files"] + ["manifest.json"]:
        with open(os.path.join(src, name), "rb") as f:
            data = f.read()
        if name == manifest["files"][1]:       # flip a byte inside the first record's payload
            data = bytearray(data)
            data[40] ^= 0xFF
            data = bytes(data)
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
    stats = pc.ReadStats()
    records = list(pc.read_embeddings(out, stats=stats).as_numpy_iterator())
    assert len(records) == 6 and stats.good == 6 and stats.missing == 4 and stats.bad == 4
    report = pc.validate_shards(out)
    assert report["good"] == 6 and report["bad"] == 1

    # A well-formed record with the wrong embedding size is skipped and counted as invalid.
    good = next(iter(tf.data.TFRecordDataset(os.path.join(src, manifest["files"][2]))))
    ex = tf.train.Example.FromString(good.numpy())
    ex.features.feature["text_embed"].float_list.value.pop()
    extra = os.path.join(out, "embeds-extra.tfrecord")
    with tf.io.TFRecordWriter(extra) as w:
        w.write(ex.SerializeToString())
        w.write(good.numpy())
        w.write(b"not a tf.train.Example")
    stats = pc.ReadStats()
    records = list(pc.read_embeddings(extra, stats=stats).as_numpy_iterator())
    assert len(records) == 1 and stats.seen == 3 and stats.invalid == 2


def test_errors(written, model, tmp_path):
    out, _ = written
    with pytest.raises(pc.PrecomputeError, match="already holds embeddings"):
        pc.precompute(model, pc.shapes_batches(0, "test", 2, 2), out, batch_size=2)
    with pytest.raises(pc.PrecomputeError, match="No embedding shards match"):
        pc.read_embeddings(str(tmp_path / "nothing-*.tfrecord"))
    with pytest.raises(pc.PrecomputeError, match="no manifest.json"):
        pc.read_embeddings(str(tmp_path))
    with pytest.raises(pc.PrecomputeError, match="needs a 'caption'"):
        pc.precompute(model, [{"image": np.zeros((2, 32, 32, 3), np.uint8)}],
                      str(tmp_path / "x"), batch_size=2)


def test_cli_precompute(model, tmp_path, capsys):
    clip_dir = str(tmp_path / "clip")
    hf_clip.save_pretrained(model, clip_dir)
    out = str(tmp_path / "out")
    rc = cli.main(["precompute", "--clip", clip_dir, "--out", out, "--input", "shapes:train",
                   "--num", "5", "--batch-size", "4", "--image-size", "64"])
    assert rc == 0, capsys.readouterr().err
    assert "wrote 5 examples in 1 shards" in capsys.readouterr().out
    assert glob.glob(os.path.join(out, "embeds-00000-of-00001.tfrecord"))
    rec = next(pc.read_embeddings(out).as_numpy_iterator())
    assert rec["image"].shape == (64, 64, 3)
    assert rec["caption"].decode() == shapes.example(0, "train", 0).scene.caption
    rc = cli.main(["precompute", "--clip", clip_dir, "--out", str(tmp_path / "o2"),
                   "--input", "shapes:train"])
    assert rc == 2 and "--num N" in capsys.readouterr().err
