"""Hostile inputs to ``unclip-jax train`` and ``unclip-jax precompute``: every one is refused in
one line (exit status 2, no traceback) before any work, and every file of the workdir (its
checkpoints included) is left as it was. A corrupt latest checkpoint is moved aside (not
deleted) and the run resumes from the newest one that restores.

One tiny diffusion-prior run (4 steps, checkpoints 2 and 4) is trained once for the module; each
case works on a copy of it. Refusals come before the model is built, so each case is fast.
"""
import glob
import os
import shutil

import pytest

from hostile import assert_refused, run_cli, snapshot
from unclip_jax.config import load_config
from unclip_jax.train import checkpoint as ckpt
from unclip_jax.train.trainer import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRIOR = os.path.join(REPO, "configs", "diffusion_prior.py") + ":runlocal"
DECODER = os.path.join(REPO, "configs", "decoder.py") + ":runlocal"
UPSAMPLER = os.path.join(REPO, "configs", "upsampler.py") + ":runlocal"
AR_PRIOR = os.path.join(REPO, "configs", "ar_prior.py") + ":runlocal"
TINY = ["mesh.min_shard_bytes=0", "model.num_layers=1", "log_every=2", "eval_every=0",
        "checkpoint.every_steps=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("hostile_train") / "run")
    train(load_config(PRIOR, TINY + ["total_steps=4"]), workdir, progress=False)
    assert sorted(os.listdir(ckpt.checkpoint_dir(workdir))) == ["2", "4"]
    return workdir


@pytest.fixture
def workdir(trained, tmp_path):
    """A copy of the trained workdir (checkpoints 2 and 4) for one case to attack."""
    dst = str(tmp_path / "run")
    shutil.copytree(trained, dst)
    return dst


def _train(workdir, *overrides, config=PRIOR):
    return (["train", "--config", config, "--workdir", workdir, "--no-progress"]
            + [f"--config.{o}" for o in TINY + ["total_steps=4"] + list(overrides)])


# ------------------------------------------------------------------------------------------
# config values: refused before anything is built or written
# ------------------------------------------------------------------------------------------

BAD_OVERRIDES = [
    (["batch_size=0"], "batch_size"),
    (["batch_size=-4"], "batch_size"),
    (["batch_size=3"], "multiple of"),                  # 8 simulated devices
    (["batch_size=abc"], "batch_size"),
    (["batch_size=1.5"], "batch_size"),
    (["checkpoint.every_steps=0"], "every_steps"),
    (["checkpoint.every_steps=-1"], "every_steps"),
    (["checkpoint.keep=0"], "keep"),
    (["checkpoint.keep=-2"], "keep"),
    (["checkpoint.async_save=maybe"], "async_save"),
    (["total_steps=-1"], "total_steps"),
    (["optimizer.learning_rate=nan"], "learning_rate"),
    (["optimizer.learning_rate=inf"], "learning_rate"),
    (["optimizer.learning_rate=-1"], "learning_rate"),
    (["optimizer.b1=1.0"], "b1"),
    (["optimizer.b2=1.5"], "b2"),
    (["optimizer.eps=0"], "eps"),
    (["optimizer.weight_decay=-1"], "weight_decay"),
    (["optimizer.warmup_steps=-5"], "warmup_steps"),
    (["optimizer.grad_clip_norm=-1"], "grad_clip_norm"),
    (["optimizer.lr_schedule=nope"], "lr_schedule"),
    (["optimizer.lr_schedule=cosine", "optimizer.warmup_steps=10"], "warmup_steps"),
    (["optimizer.accum_steps=0"], "accum_steps"),
    (["optimizer.accum_steps=3"], "multiple of"),
    (["ema_decay=1.5"], "ema_decay"),
    (["ema_decay=-0.1"], "ema_decay"),
    (["seed=-1"], "seed"),
    (["seed=99999999999999999999999"], "seed"),
    (["log_every=0"], "log_every"),
    (["eval_every=-1"], "eval_every"),
    (["mesh.data=0"], "mesh.data"),
    (["mesh.data=3"], "mesh"),
    (["mesh.fsdp=-2"], "mesh.fsdp"),
    (["mesh.rules=embed"], "sharding rule"),
    (["mesh.rules=embed=nowhere"], "not a mesh axis"),
    (["mesh.min_shard_bytes=-1"], "min_shard_bytes"),
    (["mesh.cpu_devices=-2"], "cpu_devices"),
    (["mesh.cpu_devices=two"], "cpu_devices"),
    (["diffusion.num_train_steps=0"], "num_train_steps"),
    (["diffusion.num_train_steps=1000000000"], "num_train_steps"),
    (["diffusion.schedule=nope"], "schedule"),
    (["diffusion.cond_drop_prob=2"], "cond_drop_prob"),
    (["diffusion.cond_drop_prob=nan"], "cond_drop_prob"),
    (["model.dtype=float99"], "dtype"),
    (["model.dtype=int8"], "floating dtype"),
    (["model.param_dtype=bool"], "param_dtype"),
    (["model.num_layers=0"], "num_layers"),
    (["model.num_heads=-1"], "num_heads"),
    (["model.dropout=1.5"], "dropout"),
    (["model.embed_norm=nope"], "embed_norm"),
    (["stage=nope"], "unknown stage"),
    (["nope=1"], "unknown config key"),
    (["optimizer=1"], "is a group"),
    (["model.num_layers"], "no value"),
    (["input.num_concepts=0"], "num_concepts"),
    (["input.context_length=0"], "context_length"),
    (["input.task_seed=-1"], "task_seed"),
    (["input.kind=nope", "total_steps=6"], "input"),
]


@pytest.mark.parametrize("overrides,says", BAD_OVERRIDES,
                         ids=[" ".join(o) for o, _ in BAD_OVERRIDES])
def test_bad_config_value_is_refused_and_the_workdir_kept(capsys, workdir, overrides, says):
    assert_refused(capsys, _train(workdir, *overrides), says=says, keep=[workdir])


OTHER_STAGES = [
    (DECODER, ["diffusion.prediction_type=x"], "prediction_type"),
    (DECODER, ["diffusion.image_drop_prob=-0.5"], "image_drop_prob"),
    (DECODER, ["diffusion.vlb_weight=-1"], "vlb_weight"),
    (DECODER, ["model.channel_mult=(1,'a')"], "channel_mult"),
    (DECODER, ["model.channel_mult="], "channel_mult"),
    (UPSAMPLER, ["crop_fraction=0"], "crop_fraction"),
    (UPSAMPLER, ["crop_fraction=nan"], "crop_fraction"),
    (UPSAMPLER, ["crop_fraction=4"], "crop_fraction"),
    (AR_PRIOR, ["text_drop_prob=3"], "text_drop_prob"),
    (AR_PRIOR, ["quantizer.fit_examples=-5"], "fit_examples"),
    (AR_PRIOR, ["quantizer.max_quantile_samples=0"], "max_quantile_samples"),
    (AR_PRIOR, ["sample.top_p=2"], "top_p"),
    (AR_PRIOR, ["sample.temperature=-1"], "temperature"),
    (AR_PRIOR, ["sample.best_of=0"], "best_of"),
]


@pytest.mark.parametrize("config,overrides,says", OTHER_STAGES,
                         ids=[f"{os.path.basename(c)} {' '.join(o)}" for c, o, _ in OTHER_STAGES])
def test_bad_stage_setting_is_refused(capsys, tmp_path, config, overrides, says):
    workdir = str(tmp_path / "run")
    argv = ["train", "--config", config, "--workdir", workdir] + [f"--config.{o}"
                                                                  for o in overrides]
    assert_refused(capsys, argv, says=says, keep=[tmp_path])
    assert not os.path.exists(workdir)


@pytest.mark.parametrize("overrides,says", [
    (["input.dim=16"], "x_t must be"),
    (["input.text_width=5"], "text_hidden"),
    (["model.context_length=3"], "text_hidden"),
    (["eval_every=1", "sampling.best_of=0"], "best_of"),
], ids=["input-dim", "input-width", "model-context", "sample-best-of"])
def test_settings_that_do_not_fit_are_refused_before_writing(capsys, tmp_path, overrides, says):
    workdir = str(tmp_path / "run")
    argv = _train(workdir, "total_steps=2", *overrides)
    assert_refused(capsys, argv, says=("do not fit", says), keep=[tmp_path])
    assert not os.path.exists(workdir)


# ------------------------------------------------------------------------------------------
# config files and arguments
# ------------------------------------------------------------------------------------------

CONFIG_FILES = [
    ("boom.py", "raise RuntimeError('boom')\n", "failed to load"),
    ("syntax.py", "def get_config(\n", "failed to load"),
    ("noget.py", "x = 1\n", "no get_config"),
    ("five.py", "def get_config(arg=None):\n    return 5\n", "not an ml_collections"),
    ("raises.py", "def get_config(arg=None):\n    raise KeyError('x')\n", "failed"),
    ("nul.py", "\x00\x00", "failed to load"),
    ("notpy.txt", "def get_config(arg=None):\n    return None\n", "not a python file"),
]


@pytest.mark.parametrize("name,text,says", CONFIG_FILES, ids=[c[0] for c in CONFIG_FILES])
def test_bad_config_file_is_refused(capsys, tmp_path, workdir, name, text, says):
    path = tmp_path / name
    path.write_text(text)
    assert_refused(capsys, ["train", "--config", path, "--workdir", workdir], says=says,
                   keep=[workdir])


@pytest.mark.parametrize("spec,says", [
    ("configs/nope.py", "does not exist"),
    ("configs", "is a folder"),
    (os.path.join(REPO, "configs", "diffusion_prior.py") + ":size=nope", "preset"),
    (os.path.join(REPO, "configs", "diffusion_prior.py") + ":runlocal=maybe", "runlocal"),
    (os.path.join(REPO, "configs", "diffusion_prior.py") + ":bogus=1", "bogus"),
    (os.path.join(REPO, "configs", "shapes.py") + ":stage=nope", "stage"),
], ids=["missing", "folder", "unknown-preset", "bad-bool-arg", "unknown-arg", "shapes-stage"])
def test_bad_config_spec_is_refused(capsys, workdir, spec, says):
    assert_refused(capsys, ["train", "--config", spec, "--workdir", workdir], says=says,
                   keep=[workdir])


@pytest.mark.parametrize("flags,says", [
    (["--num-processes", "0"], "at least 1"),
    (["--num-processes", "2", "--process-id", "5"], "process id"),
    (["--local-device-ids", "a,b"], "local-device-ids"),
], ids=["no-processes", "process-id", "device-ids"])
def test_bad_distributed_flags_are_refused(capsys, workdir, flags, says):
    assert_refused(capsys, _train(workdir) + flags, says=says, keep=[workdir])


# ------------------------------------------------------------------------------------------
# workdirs
# ------------------------------------------------------------------------------------------

def test_workdir_that_is_a_file_is_refused(capsys, tmp_path):
    f = tmp_path / "run"
    f.write_text("mine")
    assert_refused(capsys, _train(str(f)), says="is a file", keep=[tmp_path])


def test_workdir_under_a_file_is_refused(capsys, tmp_path):
    f = tmp_path / "run"
    f.write_text("mine")
    assert_refused(capsys, _train(str(f / "sub")), says="is a file", keep=[tmp_path])


def test_workdir_with_a_file_named_checkpoints_is_refused(capsys, tmp_path):
    (tmp_path / "checkpoints").write_text("mine")
    assert_refused(capsys, _train(str(tmp_path)), says="checkpoints", keep=[tmp_path])


def test_workdir_with_a_folder_named_train_log_is_refused(capsys, workdir):
    os.remove(os.path.join(workdir, "train.log"))
    os.makedirs(os.path.join(workdir, "train.log"))
    assert_refused(capsys, _train(workdir), says="train.log", keep=[workdir])


def test_empty_workdir_name_is_refused(capsys):
    assert_refused(capsys, _train(""), says="--workdir")


def test_workdir_with_an_unsupported_scheme_is_refused(capsys):
    assert_refused(capsys, _train("gs2://bucket/run"), says="scheme")


def test_unwritable_workdir_is_refused(capsys, tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:   # root writes everywhere: deny it the way the kernel denies a user
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p).startswith(
            str(ro)) and mode & os.W_OK else real(p, mode, **kw))
    try:
        assert_refused(capsys, _train(str(ro / "run")), says="permission", keep=[tmp_path])
    finally:
        ro.chmod(0o755)


# ------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------

def _truncate_arrays(workdir, step):
    files = glob.glob(os.path.join(ckpt.checkpoint_dir(workdir), str(step), "state", "**", "d",
                                   "*"), recursive=True)
    assert files
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)


def _garble_meta(workdir, step, text="\x00garbage{["):
    with open(os.path.join(ckpt.checkpoint_dir(workdir), str(step), "meta", "metadata"),
              "w") as fh:
        fh.write(text)


def test_checkpoint_of_another_config_is_refused(capsys, workdir):
    assert_refused(capsys, _train(workdir, "model.num_layers=2"), says="does not match",
                   keep=[workdir])


def test_keep_zero_never_deletes_checkpoints(capsys, workdir):
    assert_refused(capsys, _train(workdir, "checkpoint.keep=0", "total_steps=8"), says="keep",
                   keep=[workdir])
    assert sorted(os.listdir(ckpt.checkpoint_dir(workdir))) == ["2", "4"]


@pytest.mark.parametrize("garble", ["meta", "meta-list", "meta-wrong-step", "empty-step"])
def test_no_restorable_checkpoint_is_one_line_and_nothing_moves(capsys, workdir, garble):
    for step in (2, 4):
        if garble == "meta":
            _garble_meta(workdir, step)
        elif garble == "meta-list":
            _garble_meta(workdir, step, "[1, 2]")
        elif garble == "meta-wrong-step":
            _garble_meta(workdir, step, '{"step": "x", "shapes": 5}')
        else:
            shutil.rmtree(os.path.join(ckpt.checkpoint_dir(workdir), str(step)))
            os.makedirs(os.path.join(ckpt.checkpoint_dir(workdir), str(step)))
    assert_refused(capsys, _train(workdir), says=("no checkpoint", "can be restored", "4", "2"),
                   keep=[workdir])


@pytest.mark.parametrize("damage", ["truncated-arrays", "garbage-meta"])
def test_corrupt_latest_checkpoint_is_moved_aside_and_the_run_resumes(capsys, workdir, damage):
    if damage == "truncated-arrays":
        _truncate_arrays(workdir, 4)
    else:
        _garble_meta(workdir, 4)
    before = snapshot(os.path.join(ckpt.checkpoint_dir(workdir), "4"))
    # total_steps=2: the run restores checkpoint 2 and has nothing left to train (no compile)
    rc, out, err = run_cli(capsys, _train(workdir, "total_steps=2"))
    assert rc == 0, err
    assert "Traceback" not in err
    names = os.listdir(ckpt.checkpoint_dir(workdir))
    moved = [n for n in names if n.startswith("4" + ckpt.CORRUPT_TAG)]
    assert len(moved) == 1 and "2" in names and "4" not in names, names
    assert "checkpoint 4 is corrupt" in out and moved[0] in out and "resumed from step 2" in out
    # moved, not changed: the same bytes under the new name
    moved_dir = os.path.join(ckpt.checkpoint_dir(workdir), moved[0])
    after = snapshot(moved_dir)
    assert sorted(v for v in after.values()) == sorted(v for v in before.values())
    manager = ckpt.make_manager(workdir)
    assert manager.all_steps() == [2]      # Orbax does not take the moved folder for a step
    manager.close()


class _FakeManager:
    """Enough of an Orbax CheckpointManager for save_or_explain."""

    def __init__(self, error=None):
        self.error, self.closed = error, False

    def all_steps(self):
        return [2]

    def save(self, *args, **kwargs):
        if self.error is not None:
            raise self.error

    def close(self):
        self.closed = True


@pytest.mark.parametrize("error,says", [
    (ValueError("OUT_OF_RANGE: Error writing x: Failed to write 5 bytes: [os_error_code='28']"),
     "No space left on device"),
    (OSError(122, "Disk quota exceeded"), "Disk quota exceeded"),
    (ValueError("PERMISSION_DENIED: Permission denied writing y"), "Permission denied"),
], ids=["enospc", "quota", "permission"])
def test_failed_checkpoint_write_is_one_user_error(error, says):
    state = {"x": __import__("numpy").zeros(3)}
    manager = _FakeManager(error)
    with pytest.raises(ckpt.CheckpointSaveError, match=says) as e:
        ckpt.save_or_explain(manager, "/tmp/does-not-matter", 4, state, {})
    assert "checkpoint 2 is intact" in str(e.value) and manager.closed


def test_full_disk_is_refused_before_writing(monkeypatch):
    monkeypatch.setattr(ckpt, "_free_bytes", lambda folder: 1000)
    manager = _FakeManager(AssertionError("must not write"))
    with pytest.raises(ckpt.CheckpointSaveError, match="free"):
        ckpt.save_or_explain(manager, "/tmp/does-not-matter", 4,
                             {"x": __import__("numpy").zeros(1 << 20)}, {})


def test_other_save_errors_are_not_disguised():
    with pytest.raises(RuntimeError, match="a bug"):
        ckpt.save_or_explain(_FakeManager(RuntimeError("a bug")), "/tmp/x", 4,
                             {"x": __import__("numpy").zeros(3)}, {})


# ------------------------------------------------------------------------------------------
# precompute
# ------------------------------------------------------------------------------------------

def _precompute(out, *flags):
    return ["precompute", "--input", "shapes:train", "--num", "4", "--out", out] + list(flags)


@pytest.mark.parametrize("flags,says", [
    (["--num", "0"], "--num"),
    (["--num", "-3"], "--num"),
    (["--batch-size", "0"], "--batch-size"),
    (["--examples-per-shard", "0"], "--examples-per-shard"),
    (["--image-size", "0"], "--image-size"),
    (["--image-size", "100000"], "--image-size"),
    (["--seed", "-1"], "--seed"),
    (["--seed", "99999999999999999999999"], "--seed"),
    (["--input", "nope:x"], "unknown --input"),
    (["--input", "tfds:shapes:train", "--data-dir", "/nonexistent-unclip"], "--data-dir"),
    (["--clip", "/nonexistent-unclip"], "--clip"),
    (["--config.x=1"], "need --config"),
    (["--batch-size", "x"], "invalid int"),
    (["--input", "shapes:bogus"], "splits"),
    (["--input", "tfds:nonexistent_ds:train", "--data-dir", "{tmp}"], "cannot load"),
    (["--input", "tfds::train", "--data-dir", "{tmp}"], "tfds:NAME:SPLIT"),
    (["--input", "config"], "--config"),
], ids=["num0", "num-neg", "batch0", "shard0", "size0", "size-huge", "seed-neg", "seed-huge",
        "input", "data-dir", "clip", "override", "batch-text", "shapes-split", "tfds-missing",
        "tfds-no-name", "config-without-file"])
def test_precompute_bad_flag_is_refused(capsys, tmp_path, flags, says):
    out = tmp_path / "emb"
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    assert_refused(capsys, _precompute(str(out), *flags), says=says, keep=[tmp_path])
    assert not out.exists()


def test_precompute_refuses_existing_embeddings_without_overwrite(capsys, tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    (tmp_path / "embeds-00000-of-00001.tfrecord").write_bytes(b"old")
    (tmp_path / "notes.txt").write_text("mine")
    assert_refused(capsys, _precompute(str(tmp_path)), says="--overwrite", keep=[tmp_path])


@pytest.mark.parametrize("where,says", [("file", "is a file"), ("under-file", "is a file"),
                                        ("manifest-folder", "is a folder")])
def test_precompute_bad_out_is_refused(capsys, tmp_path, where, says):
    (tmp_path / "f").write_text("mine")
    out = {"file": tmp_path / "f", "under-file": tmp_path / "f" / "emb",
           "manifest-folder": tmp_path / "emb"}[where]
    if where == "manifest-folder":
        (out / "manifest.json").mkdir(parents=True)
    assert_refused(capsys, _precompute(str(out), "--overwrite"), says=says, keep=[tmp_path])


@pytest.mark.parametrize("damage", ["truncated-arrays", "garbage-meta"])
def test_export_of_a_corrupt_checkpoint_is_one_line(capsys, workdir, tmp_path, damage):
    if damage == "truncated-arrays":
        _truncate_arrays(workdir, 4)
    else:
        _garble_meta(workdir, 4)
    out = tmp_path / "bundle"
    assert_refused(capsys, ["export", "--workdir", workdir, "--out", out, "--name", "prior"],
                   says=("checkpoint 4", "cannot be read"), keep=[workdir])
    assert not out.exists()
