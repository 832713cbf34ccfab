"""`unclip-jax tfrecord`: tar shards -> TFRecord through the CLI, read back by the native reader;
an existing output is refused in one line (tests/hostile.py) and kept."""
import os

from data_fixtures import write_shards
from hostile import assert_refused, run_cli
from unclip_jax.data import readers


def test_tfrecord_command_converts_and_refuses_to_overwrite(capsys, tmp_path):
    written = write_shards(tmp_path / "tars", n_shards=2, per_shard=3)
    out = tmp_path / "tfr"
    rc, stdout, err = run_cli(capsys, ["tfrecord", str(tmp_path / "tars" / "*.tar"), "--out", out])
    assert rc == 0, err
    assert "wrote 6 records to 2 TFRecord files" in stdout
    assert sorted(os.listdir(out)) == ["00000.tfrecord", "00001.tfrecord"]
    keys = {r["key"].decode() for path in sorted(out.iterdir())
            for r in readers.iter_tfrecord_records(str(path)) if not r["error"]}
    assert keys == set(written)
    (out / "notes.txt").write_text("mine")
    assert_refused(capsys, ["tfrecord", str(tmp_path / "tars" / "*.tar"), "--out", out],
                   says=("already has", "--overwrite"), keep=[out])
    rc, _, err = run_cli(capsys, ["tfrecord", str(tmp_path / "tars" / "*.tar"), "--out", out,
                                  "--overwrite"])
    assert rc == 0, err
    assert (out / "notes.txt").read_text() == "mine"


def test_tfrecord_command_refuses_files_that_are_not_tar_shards(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("not a tar")
    out = tmp_path / "tfr"
    assert_refused(capsys, ["tfrecord", tmp_path / "notes.txt", "--out", out],
                   says=("no usable record", "nothing was written"), keep=[tmp_path])
    assert not out.exists() or not os.listdir(out)
