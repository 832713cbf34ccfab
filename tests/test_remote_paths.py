"""Remote workdirs, pipeline folders and data on a fake GCS bucket (unclip_jax.io.paths).

The bucket is gcp-storage-emulator on 127.0.0.1. Every process that could talk to gs:// (the
emulator, the scenario, the `unclip-jax train` runs it starts) runs in a fresh network namespace
with only loopback (`unshare -n`): the scenario half of this file refuses to run anywhere else,
so nothing here can reach a real bucket or a metadata server. Orbax / TensorStore, etils.epath
(fsspec + gcsfs) are all pointed at the emulator.

  train     `unclip-jax train --workdir gs://bucket/run` (tiny upsampler, its tar shard in the
            bucket) SIGTERMed after its first checkpoint, then resumed to the end: metrics,
            TensorBoard events, sample PNGs and checkpoints in the bucket, nothing on local disk
  pipeline  save_pretrained / from_pretrained round trip on gs://
  reader    read_webdataset of a tar shard on gs://
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
import pytest

from unclip_jax.io import paths

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PORT = 9023
BUCKET = "bucket"
ENDPOINT = f"http://127.0.0.1:{PORT}"
GCS_ENV = {  # every client -> the emulator; no credentials looked up anywhere
    "STORAGE_EMULATOR_HOST": ENDPOINT, "FSSPEC_GCS_TOKEN": "anon", "EPATH_USE_TF": "false",
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "NO_GCE_CHECK": "true",
    "TENSORSTORE_GCS_HTTP_URL": ENDPOINT, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake",
    "GOOGLE_CLOUD_PROJECT": "test"}
STEPS = 16
TRAIN = ["--config", os.path.join(REPO, "configs", "upsampler.py") + ":runlocal",
         "--no-progress", f"--config.total_steps={STEPS}", "--config.checkpoint.every_steps=4",
         "--config.eval_every=4", "--config.log_every=2", "--config.sampling.steps=2",
         "--config.input.kind=webdataset", f'--config.input.paths=["gs://{BUCKET}/data/*.tar"]']


# ------------------------------------------------------------------------------ pytest side

def _sandboxed(scenario: str, timeout: int = 400) -> str:
    """Run ``scenario`` of this file in a fresh network namespace (loopback only)."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.fail("These tests need `unshare` and `ip` (util-linux, iproute2) to run the fake "
                    "bucket in a network namespace with loopback only; install them.")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
               JAX_COMPILATION_CACHE_DIR=tempfile.mkdtemp(prefix="unclip_jax_test_cache_"))
    env.update(GCS_ENV)
    env.pop("XLA_FLAGS", None)
    cmd = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', sys.executable,
           os.path.abspath(__file__), scenario]
    proc = subprocess.run(cmd, env=env, cwd=tempfile.mkdtemp(prefix="unclip_jax_remote_"),
                          capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    if "unshare failed" in out or ("Operation not permitted" in out and proc.returncode):
        pytest.fail("`unshare -n` is not allowed here (it needs root or user namespaces); these "
                    "tests must run the fake bucket isolated from the network:\n" + out[-2000:])
    assert proc.returncode == 0 and f"SCENARIO {scenario} OK" in proc.stdout, out[-6000:]
    return proc.stdout


def test_train_sigterm_and_resume_on_a_bucket():
    out = _sandboxed("train")
    print(out[-3000:])


def test_pipeline_folder_round_trip_on_a_bucket():
    _sandboxed("pipeline")


def test_tar_reader_on_a_bucket():
    _sandboxed("reader")


def test_unsupported_scheme_is_one_clear_error(tmp_path):
    for bad in ("ftp://host/run", "memory://x", "http://example.com/a"):
        with pytest.raises(paths.PathError, match="scheme is not supported"):
            paths.check(bad)
    from unclip_jax.train.metrics import MetricWriter
    with pytest.raises(paths.PathError, match="ftp:// scheme"):
        MetricWriter("ftp://host/run")
    assert not paths.is_remote(str(tmp_path)) and paths.is_remote("gs://b/x")


def test_local_paths_unchanged(tmp_path):
    d = str(tmp_path)
    f = paths.AppendFile(paths.join(d, "log.txt"))
    f.write("a\n")
    f.close()
    f = paths.AppendFile(paths.join(d, "log.txt"))
    f.write("b\n")
    f.close()
    assert open(os.path.join(d, "log.txt")).read() == "a\nb\n"
    paths.makedirs(paths.join(d, "x", "y"))
    paths.write_bytes(paths.join(d, "x", "y", "1.tar"), b"1")
    assert paths.glob(paths.join(d, "x", "*", "*.tar")) == [os.path.join(d, "x", "y", "1.tar")]
    assert paths.files_under(d) == sorted([os.path.join(d, "log.txt"),
                                           os.path.join(d, "x", "y", "1.tar")])
    assert paths.absolute("rel") == os.path.abspath("rel")
    assert paths.join("gs://b/run", "checkpoints") == "gs://b/run/checkpoints"


# ------------------------------------------------------------------------------ sandbox side

def _require_isolated() -> None:
    links = sorted(name for _, name in socket.if_nameindex())   # this network namespace
    if links != ["lo"]:
        sys.exit(f"refusing to run a gs:// client outside a loopback-only network namespace "
                 f"(network links here: {links}); run it through the pytest tests.")


# gcp-storage-emulator, plus the x-goog-generation header that real GCS sends with an object's
# bytes and TensorStore's OCDBT reads (the emulator leaves it out), serving requests in threads
# (one slow reader must not stall the trainer's other requests).
EMULATOR = """
import sys
from http import server
server.HTTPServer = server.ThreadingHTTPServer
from gcp_storage_emulator.handlers import objects
_download = objects.download
def download(request, response, storage, *args, **kwargs):
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        response["x-goog-generation"] = str(obj["generation"])
    except Exception:
        pass
    return _download(request, response, storage, *args, **kwargs)
objects.download = download
from gcp_storage_emulator.server import create_server
create_server("127.0.0.1", int(sys.argv[1]), in_memory=True, default_bucket=sys.argv[2]).run()
"""


def _start_emulator() -> subprocess.Popen:
    emu = subprocess.Popen([sys.executable, "-c", EMULATOR, str(PORT), BUCKET],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", PORT), 0.2).close()
            return emu
        except OSError:
            time.sleep(0.05)
    emu.kill()
    sys.exit("the storage emulator did not start")


def _objects(prefix: str = "") -> dict[str, int]:
    """name -> size of the bucket's objects, listed through the emulator's JSON API."""
    out, token = {}, ""
    while True:
        url = f"{ENDPOINT}/storage/v1/b/{BUCKET}/o?prefix={prefix}" + (
            f"&pageToken={token}" if token else "")
        with urllib.request.urlopen(url, timeout=10) as r:
            page = json.load(r)
        out.update({o["name"]: int(o["size"]) for o in page.get("items", [])})
        token = page.get("nextPageToken")
        if not token:
            return out


def _checkpoints() -> list[int]:
    names = _objects("run/checkpoints/")
    return sorted(int(m.group(1)) for n in names
                  if (m := re.fullmatch(r"run/checkpoints/(\d+)/commit_success\.txt", n)))


def _upload_shard() -> None:
    import data_fixtures
    local = tempfile.mkdtemp(prefix="unclip_jax_shard_")
    data_fixtures.write_shards(local, 1, 8)
    paths.write_bytes(f"gs://{BUCKET}/data/00000.tar",
                      open(os.path.join(local, "00000.tar"), "rb").read())
    shutil.rmtree(local)


def scenario_train() -> None:
    _upload_shard()
    cwd = tempfile.mkdtemp(prefix="unclip_jax_cwd_")
    cli = [sys.executable, "-m", "unclip_jax.cli", "train", "--workdir", f"gs://{BUCKET}/run"]
    p = subprocess.Popen(cli + TRAIN, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and not _checkpoints():
        time.sleep(0.05)
    first = _checkpoints()
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=300)
    print(out)
    assert p.returncode == 0, out
    stopped = int(re.search(r"stopped by signal 15 at step (\d+)", out).group(1))
    print(f"first checkpoint {first}; SIGTERM -> stopped at step {stopped}")
    assert first and stopped < STEPS and _checkpoints()[-1] == stopped, (first, stopped)
    before = _objects("run/")
    print("after SIGTERM:", json.dumps(_summary(before), indent=1))

    out = subprocess.run(cli + TRAIN, cwd=cwd, capture_output=True, text=True, timeout=300)
    print(out.stdout[-2000:])
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"resumed from step {stopped}" in out.stdout, out.stdout
    objects = _objects("run/")
    print("after resume:", json.dumps(_summary(objects), indent=1))
    assert _checkpoints()[-1] == STEPS
    metrics = [json.loads(line) for line in
               paths.read_bytes(f"gs://{BUCKET}/run/metrics.jsonl").decode().splitlines()]
    steps = [m["step"] for m in metrics if "loss" in m]
    assert steps == sorted(steps) and stopped in steps and steps[-1] == STEPS, steps
    assert any(s > stopped for s in steps) and any(s <= stopped for s in steps)
    events = [n for n in objects if n.startswith("run/tensorboard/events.out.tfevents.")]
    assert len(events) == 2 and all(objects[n] > 0 for n in events), events
    _check_events(events)
    pngs = [n for n in objects if re.fullmatch(r"run/samples/samples_\d{8}\.png", n)]
    assert f"run/samples/samples_{STEPS:08d}.png" in pngs and len(pngs) >= 2, pngs
    log = paths.read_bytes(f"gs://{BUCKET}/run/train.log").decode()
    assert "fresh start" in log and f"resumed from step {stopped}" in log
    assert not [n for n in objects if n.endswith(".tmp")]
    assert os.listdir(cwd) == [], f"local files written: {os.listdir(cwd)}"
    assert not os.path.exists(os.path.join(REPO, "gs:"))


def _summary(objects: dict) -> dict:
    groups: dict = {}
    for name in objects:
        parts = name.split("/")
        key = "/".join(parts[:3]) if parts[1] == "checkpoints" else \
            name if parts[1] != "samples" else "run/samples/*.png"
        groups[key] = groups.get(key, 0) + 1
    return dict(sorted(groups.items()))


def _check_events(names) -> None:
    """The event files parse (TensorBoard's reader) and hold the loss of both runs."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    steps = set()
    for name in names:
        local = tempfile.mkdtemp(prefix="unclip_jax_events_")
        path = os.path.join(local, "events")
        with open(path, "wb") as f:
            f.write(paths.read_bytes(f"gs://{BUCKET}/{name}"))
        for raw in RawEventFileLoader(path).Load():
            e = Event.FromString(raw)
            if any(v.tag == "loss" for v in e.summary.value):
                steps.add(e.step)
        shutil.rmtree(local)
    assert STEPS in steps and min(steps) <= 4, sorted(steps)


def scenario_pipeline() -> None:
    import pipeline_fixtures
    from unclip_jax.pipeline import UnCLIPPipeline
    from unclip_jax.io import pipeline_folder
    local = tempfile.mkdtemp(prefix="unclip_jax_pipe_")
    pipeline_fixtures.tiny_pipeline(os.path.join(local, "pipe"))
    remote = pipeline_fixtures.tiny_pipeline(f"gs://{BUCKET}/pipes/tiny")
    names = sorted(_objects("pipes/"))
    print(names)
    assert names == sorted(f"pipes/tiny/{n}" for n in os.listdir(os.path.join(local, "pipe")))
    a = UnCLIPPipeline.from_pretrained(os.path.join(local, "pipe"))
    b = UnCLIPPipeline.from_pretrained(remote)
    for name, module in a.components().items():
        want = pipeline_folder.module_tensors(module)
        got = pipeline_folder.module_tensors(b.components()[name])
        assert want.keys() == got.keys()
        for k in want:
            np.testing.assert_array_equal(want[k], got[k])
    b.save_pretrained(remote)   # replacing a remote folder
    assert sorted(_objects("pipes/")) == names
    shutil.rmtree(local)


def scenario_reader() -> None:
    import data_fixtures
    from unclip_jax.data import readers
    local = tempfile.mkdtemp(prefix="unclip_jax_shards_")
    written = data_fixtures.write_shards(local, 2, 3)
    for name in os.listdir(local):
        paths.write_bytes(f"gs://{BUCKET}/shards/{name}",
                          open(os.path.join(local, name), "rb").read())
    shutil.rmtree(local)
    assert readers.resolve_files(f"gs://{BUCKET}/shards/*.tar") == [
        f"gs://{BUCKET}/shards/00000.tar", f"gs://{BUCKET}/shards/00001.tar"]
    got = {r["key"].decode(): r["caption"].decode() for r in readers.read_webdataset(
        f"gs://{BUCKET}/shards/*.tar", process_index=0, process_count=1).as_numpy_iterator()}
    assert got == {k: c for k, (c, _) in written.items()}, got
    records = list(readers.iter_tar_records(f"gs://{BUCKET}/shards/missing.tar"))
    assert [r["error"] for r in records] == [b"unreadable_file"]


if __name__ == "__main__":
    _require_isolated()
    os.environ.update(GCS_ENV)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    emulator = _start_emulator()
    try:
        globals()[f"scenario_{sys.argv[1]}"]()
    finally:
        emulator.terminate()
        emulator.wait()
    print(f"SCENARIO {sys.argv[1]} OK")
