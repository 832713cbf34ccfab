"""Readers of image-caption data (unclip_jax/data/readers.py): each reads back what was written,
damage is counted not raised, per-host sharding splits the records exactly.

The helpers here write shards in tmp_path; tests/test_input_pipeline.py imports them.
"""

import numpy as np
import pytest
import tensorflow as tf

from data_fixtures import sample_records, write_shards, write_tar
from unclip_jax.data import images, readers


def records_of(ds) -> list[dict]:
    return [{k: v.decode() if k != "image_bytes" else v for k, v in r.items()}
            for r in ds.as_numpy_iterator()]


def decode_np(data: bytes) -> np.ndarray:
    return images.decode_rgb(tf.constant(data))[0].numpy()


# ----------------------------------------------------------------------------- webdataset

def test_webdataset_reads_back_keys_captions_pixels(tmp_path):
    written = write_shards(tmp_path, 2, 3)
    recs = records_of(readers.read_webdataset(str(tmp_path / "*.tar"), process_index=0,
                                              process_count=1))
    assert sorted(r["key"] for r in recs) == sorted(written)
    for r in recs:
        caption, arr = written[r["key"]]
        assert r["caption"] == caption and r["error"] == ""
        np.testing.assert_array_equal(decode_np(r["image_bytes"]), arr)


def test_truncated_tar_yields_good_records_then_one_marker(tmp_path):
    recs = sample_records(4)
    members = []
    for key, png, caption, _ in recs:
        members += [(f"{key}.png", png), (f"{key}.txt", caption.encode())]
    path = tmp_path / "t.tar"
    write_tar(path, members)
    data = path.read_bytes()
    # cut inside the third record's image data: 2 complete records survive
    header = data.index(b"000002.png")  # the tar header of the third image (512 bytes)
    (tmp_path / "cut.tar").write_bytes(data[:header + 512 + 40])
    out = list(readers.iter_tar_records(str(tmp_path / "cut.tar")))
    assert [r["key"] for r in out] == [b"000000", b"000001", str(tmp_path / "cut.tar").encode()]
    assert [r["error"] for r in out] == [b"", b"", b"truncated_shard"]
    # cut exactly between members: tarfile alone would not notice (no end-of-archive block)
    (tmp_path / "edge.tar").write_bytes(data[:header])
    out = list(readers.iter_tar_records(str(tmp_path / "edge.tar")))
    assert [r["error"] for r in out] == [b"", b"", b"truncated_shard"]
    # not a tar at all, and a missing file
    (tmp_path / "junk.tar").write_bytes(b"\x01" * 700)
    assert [r["error"] for r in readers.iter_tar_records(str(tmp_path / "junk.tar"))] == \
        [b"truncated_shard"]
    assert [r["error"] for r in readers.iter_tar_records(str(tmp_path / "nope.tar"))] == \
        [b"unreadable_file"]


def test_missing_caption_and_image_are_markers(tmp_path):
    (key, png, caption, _), = sample_records(1)
    write_tar(tmp_path / "a.tar", [("x.png", png), ("y.txt", b"only text"),
                                   (f"{key}.jpg", png), (f"{key}.txt", caption.encode())])
    out = list(readers.iter_tar_records(str(tmp_path / "a.tar")))
    assert [(r["key"], r["error"]) for r in out] == [
        (b"x", b"missing_caption"), (b"y", b"missing_image"), (key.encode(), b"")]


# ----------------------------------------------------------------------------- TFRecord

def write_tfrecord(path, recs, image_feature="image", caption_feature="caption"):
    with tf.io.TFRecordWriter(str(path)) as w:
        for key, png, caption, _ in recs:
            feats = {image_feature: tf.train.Feature(bytes_list=tf.train.BytesList(value=[png])),
                     caption_feature: tf.train.Feature(
                         bytes_list=tf.train.BytesList(value=[caption.encode()])),
                     "key": tf.train.Feature(bytes_list=tf.train.BytesList(value=[key.encode()]))}
            w.write(tf.train.Example(features=tf.train.Features(feature=feats))
                    .SerializeToString())


def test_tfrecord_reads_back_and_survives_truncation(tmp_path):
    recs = sample_records(5)
    write_tfrecord(tmp_path / "a.tfrecord", recs[:3], "jpg", "txt")
    write_tfrecord(tmp_path / "b.tfrecord", recs[3:], "jpg", "txt")
    ds = readers.read_tfrecord(str(tmp_path / "*.tfrecord"), image_feature="jpg",
                               caption_feature="txt", process_index=0, process_count=1)
    out = {r["key"]: r for r in records_of(ds)}
    assert sorted(out) == [k for k, *_ in recs]
    for key, _, caption, arr in recs:
        assert out[key]["caption"] == caption
        np.testing.assert_array_equal(decode_np(out[key]["image_bytes"]), arr)
    data = (tmp_path / "b.tfrecord").read_bytes()
    (tmp_path / "b.tfrecord").write_bytes(data[:len(data) - 30])
    errors = [r["error"] for r in readers.iter_tfrecord_records(str(tmp_path / "b.tfrecord"),
                                                                "jpg", "txt")]
    assert errors == [b"", b"truncated_shard"]


# ----------------------------------------------------------------------------- folder

def test_folder_reads_back_recursively(tmp_path):
    recs = sample_records(4)
    for i, (key, png, caption, _) in enumerate(recs):
        d = tmp_path / ("sub" if i % 2 else "") / key
        d.parent.mkdir(parents=True, exist_ok=True)
        (d.parent / f"{key}.png").write_bytes(png)
        if i != 3:
            (d.parent / f"{key}.txt").write_text(caption)
    out = records_of(readers.read_folder(str(tmp_path), process_index=0, process_count=1))
    by_key = {r["key"]: r for r in out}
    assert sorted(by_key) == ["000000", "000002", "sub/000001", "sub/000003"]
    assert by_key["sub/000003"]["error"] == "missing_caption"
    assert by_key["sub/000001"]["caption"] == recs[1][2]
    np.testing.assert_array_equal(decode_np(by_key["000002"]["image_bytes"]), recs[2][3])


# ----------------------------------------------------------------------------- tfds

def make_tfds_dataset(data_dir, n: int = 6):
    """A tiny prepared tfds dataset (image + a sequence of captions), like coco_captions."""
    import tensorflow_datasets as tfds

    class UnclipTestCaptions(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(12, 16, 3)),
                "captions": tfds.features.Sequence({"text": tfds.features.Text()})}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for key, _, caption, arr in sample_records(n):
                yield key, {"image": arr, "captions": {"text": [caption, caption + " (alt)"]}}

    builder = UnclipTestCaptions(data_dir=str(data_dir))
    builder.download_and_prepare()
    return builder.name


def test_tfds_reads_a_prepared_dataset_without_download(tmp_path):
    name = make_tfds_dataset(tmp_path)
    ds = readers.read_tfds(name, data_dir=str(tmp_path), image_feature="image",
                           caption_feature="captions/text", caption_choice="first",
                           process_index=0, process_count=1)
    out = records_of(ds)
    want = {caption: arr for _, _, caption, arr in sample_records(6)}
    assert sorted(r["caption"] for r in out) == sorted(want)
    for r in out:
        np.testing.assert_array_equal(decode_np(r["image_bytes"]), want[r["caption"]])
    halves = [records_of(readers.read_tfds(name, data_dir=str(tmp_path),
                                           caption_feature="captions/text",
                                           caption_choice="random", process_index=i,
                                           process_count=2)) for i in range(2)]
    keys = [{r["key"] for r in h} for h in halves]
    assert not keys[0] & keys[1] and len(keys[0] | keys[1]) == 6
    assert all(r["caption"].startswith("caption number") for h in halves for r in h)
    with pytest.raises(readers.ReaderError, match="not found|cannot be read"):
        readers.read_tfds("unclip_no_such_dataset", data_dir=str(tmp_path))


# ----------------------------------------------------------------------------- sharding

@pytest.mark.parametrize("n_shards", [4, 1])
def test_two_processes_split_the_records_disjointly(tmp_path, n_shards):
    written = write_shards(tmp_path, n_shards, 12 // n_shards)
    pattern = str(tmp_path / "*.tar")
    keys = [[r["key"] for r in records_of(readers.read_webdataset(
        pattern, seed=3, process_index=i, process_count=2))] for i in range(2)]
    assert not set(keys[0]) & set(keys[1])
    assert sorted(keys[0] + keys[1]) == sorted(written)
    assert len(keys[0]) == len(keys[1]) == 6


def test_no_matching_files_is_a_user_error(tmp_path):
    from unclip_jax.errors import UserError
    with pytest.raises(UserError, match="No tar shards match"):
        readers.read_webdataset(str(tmp_path / "*.tar"), process_index=0, process_count=1)
