"""Hostile folders and weight files: pipeline folders (unclip.json + safetensors), diffusers
source folders and the commands that write folders (`convert --out`, `export --out`,
save_pretrained). Each case is refused with one UserError line (CLI: exit 2, one stderr line,
no traceback) and every file that existed before is unchanged; where writing is allowed, the
user's unrelated files in the folder survive.

The tiny folders are built once per module and copied (then damaged) per case.
"""
import json
import os
import shutil
import struct

import numpy as np
import pytest

import pipeline_fixtures
from hostile import assert_refused, run_cli, snapshot
from unclip_jax.errors import UserError
from unclip_jax.io import pipeline_folder, safetensors
from unclip_jax.io.pipeline_folder import FolderError

# --------------------------------------------------------------------------------------------
# Fixtures: one tiny pipeline and one tiny diffusers Karlo per module
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return pipeline_fixtures.tiny_pipeline(tmp_path_factory.mktemp("pipe") / "pipe",
                                           ar_prior=True)


@pytest.fixture(scope="module")
def karlo(tmp_path_factory):
    from torch_reference import build_tiny_karlo   # diffusers: in the test extra, never skipped
    src = tmp_path_factory.mktemp("karlo") / "karlo"
    build_tiny_karlo(str(src), seed=3)
    return str(src)


def _copy(src, tmp_path, name="p"):
    dst = tmp_path / name
    shutil.copytree(src, dst, symlinks=True)
    return str(dst)


def _manifest(folder):
    with open(os.path.join(folder, "unclip.json")) as f:
        return json.load(f)


def _write_manifest(folder, m):
    data = m if isinstance(m, bytes) else (m if isinstance(m, str) else json.dumps(m)).encode()
    with open(os.path.join(folder, "unclip.json"), "wb") as f:
        f.write(data)


def _edit(fn):
    """A damage function editing the parsed manifest in place."""
    def damage(folder, tmp_path):
        m = _manifest(folder)
        fn(m)
        _write_manifest(folder, m)
    return damage


def _raw(text):
    def damage(folder, tmp_path):
        _write_manifest(folder, text)
    return damage


def _set(path, value):
    """Set m[path[0]][path[1]]... = value."""
    def fn(m):
        d = m
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
    return _edit(fn)


def _symlink_weights_out(folder, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.move(os.path.join(folder, "prior.safetensors"), outside / "prior.safetensors")
    os.symlink(outside / "prior.safetensors", os.path.join(folder, "prior.safetensors"))


def _subfolder_symlink_out(folder, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(os.path.join(folder, "prior.safetensors"), outside / "prior.safetensors")
    os.symlink(outside, os.path.join(folder, "sub"))
    _set(("components", "prior", "weights"), "sub/prior.safetensors")(folder, tmp_path)


def _absolute_weights(folder, tmp_path):
    other = tmp_path / "other.safetensors"
    shutil.copy(os.path.join(folder, "prior.safetensors"), other)
    _set(("components", "prior", "weights"), str(other))(folder, tmp_path)


def _manifest_symlink_out(folder, tmp_path):
    outside = tmp_path / "shared.json"
    shutil.move(os.path.join(folder, "unclip.json"), outside)
    os.symlink(outside, os.path.join(folder, "unclip.json"))


def _manifest_huge(folder, tmp_path):
    with open(os.path.join(folder, "unclip.json"), "w") as f:
        f.write(" " * (17 * 2**20) + "{}")


def _manifest_deep(folder, tmp_path):
    _write_manifest(folder, "[" * 100_000 + "]" * 100_000)


MANIFEST_CASES = {
    "manifest-symlink-out": (_manifest_symlink_out, "symlink"),
    "manifest-huge": (_manifest_huge, "bytes"),
    "manifest-deeply-nested": (_manifest_deep, "not valid JSON"),
    "manifest-is-a-list": (_raw("[1, 2]"), "format"),
    "manifest-invalid-json": (_raw("{\"format\": "), "not valid JSON"),
    "manifest-nan": (_raw('{"format": "unclip-jax-pipeline", "version": NaN}'), "not valid"),
    "manifest-not-utf8": (_raw(b'{"format": "\xff\xfe"}'), "not valid JSON"),
    "manifest-empty": (_raw(""), "not valid JSON"),
    "format-other": (_set(("format",), "diffusers"), "format"),
    "version-string": (_set(("version",), "1"), "version"),
    "version-true": (_set(("version",), True), "version"),
    "version-2": (_set(("version",), 2), "version"),
    "components-list": (_set(("components",), ["prior"]), "'components' must be an object"),
    "component-entry-list": (_set(("components", "prior"), [1]), "must be an object"),
    "component-entry-string": (_set(("components", "prior"), "x"), "must be an object"),
    "component-lacks-weights": (_edit(lambda m: m["components"]["prior"].pop("weights")),
                                "lacks 'weights'"),
    "component-lacks-config": (_edit(lambda m: m["components"]["prior"].pop("config")),
                               "lacks 'config'"),
    "component-name-slash": (_edit(lambda m: m["components"].update(
        {"../x": m["components"]["prior"]})), "component name"),
    "class-unknown": (_set(("components", "prior", "class"), "Transformer"), "unknown class"),
    "class-int": (_set(("components", "prior", "class"), 5), "unknown class"),
    "class-list": (_set(("components", "prior", "class"), ["DiffusionPrior"]), "unknown class"),
    "weights-int": (_set(("components", "prior", "weights"), 5), "'weights' 5"),
    "weights-null": (_set(("components", "prior", "weights"), None), "not a string"),
    "weights-dict": (_set(("components", "prior", "weights"), {"a": 1}), "not a string"),
    "weights-empty": (_set(("components", "prior", "weights"), ""), "is empty"),
    "weights-dotdot": (_set(("components", "prior", "weights"), "../../../../etc/passwd"),
                       "leaves the folder"),
    "weights-dotdot-inner": (_set(("components", "prior", "weights"),
                                  "a/../../prior.safetensors"), "leaves the folder"),
    "weights-backslash-dotdot": (_set(("components", "prior", "weights"),
                                      "..\\prior.safetensors"), "leaves the folder"),
    "weights-absolute-etc": (_set(("components", "prior", "weights"), "/etc/passwd"),
                             "absolute"),
    "weights-absolute-other-folder": (_absolute_weights, "absolute"),
    "weights-url": (_set(("components", "prior", "weights"), "gs://bucket/prior.safetensors"),
                    "URL"),
    "weights-symlink-out": (_symlink_weights_out, "symlink"),
    "weights-subfolder-symlink-out": (_subfolder_symlink_out, "symlink"),
    "weights-shared": (_set(("components", "prior", "weights"), "decoder.safetensors"),
                       "share the weights"),
    "weights-missing-file": (_set(("components", "prior", "weights"), "gone.safetensors"),
                             "lacks gone.safetensors"),
    "config-list": (_set(("components", "prior", "config"), [1, 2]), "'config' must be"),
    "config-null": (_set(("components", "prior", "config"), None), "'config' must be"),
    "config-unknown-key": (_set(("components", "prior", "config", "wings"), 2), "wings"),
    "config-int-string": (_set(("components", "prior", "config", "num_layers"), "many"),
                          "num_layers"),
    "config-int-float": (_set(("components", "prior", "config", "num_layers"), 1.5),
                         "num_layers"),
    "config-int-negative": (_set(("components", "prior", "config", "num_heads"), -2),
                            "num_heads"),
    "config-int-bool": (_set(("components", "prior", "config", "num_layers"), True),
                        "num_layers"),
    "config-int-huge": (_set(("components", "prior", "config", "embed_dim"), 10**30),
                        "embed_dim"),
    "config-layers-hang": (_set(("components", "prior", "config", "num_layers"), 10**9),
                           "more layers"),
    "config-float-string": (_set(("components", "prior", "config", "layer_norm_eps"), "tiny"),
                            "layer_norm_eps"),
    "config-bool-string": (_set(("components", "prior", "config", "prd_token"), "yes"),
                           "prd_token"),
    "config-dtype-int8": (_set(("components", "prior", "config", "dtype"), "int8"), "dtype"),
    "config-str-list": (_set(("components", "prior", "config", "embed_norm"), ["mean_std"]),
                        "embed_norm"),
    "config-tuple-string": (_set(("components", "decoder", "config", "channel_mult"), "1"),
                            "channel_mult"),
    "config-tuple-long": (_set(("components", "decoder", "config", "channel_mult"),
                               [1] * 10_000), "channel_mult"),
    "config-per-level-negative": (_set(("components", "decoder", "config", "num_res_blocks"),
                                       [1, -2]), "num_res_blocks"),
    "config-per-level-nested-deep": (_set(("components", "decoder", "config", "head_dim"),
                                          [[[[8]]]]), "head_dim"),
    "config-zero-heads": (_set(("components", "prior", "config", "num_heads"), 0), "prior"),
    "config-decoder-groups-zero": (_set(("components", "decoder", "config", "groups"), 0),
                                   "decoder"),
    "tokenizer-list": (_set(("tokenizer",), [77]), "'tokenizer' must be"),
    "tokenizer-ctx-string": (_set(("tokenizer", "context_length"), "77"), "context_length"),
    "tokenizer-ctx-zero": (_set(("tokenizer", "context_length"), 0), "context_length"),
    "tokenizer-pad-negative": (_set(("tokenizer", "pad_id"), -1), "pad_id"),
    "sampling-list": (_set(("sampling",), []), "'sampling' must be"),
    "sampling-stage-list": (_set(("sampling", "decoder"), [25]), "sampling.decoder"),
    "sampling-steps-many": (_set(("sampling", "decoder", "steps"), "many"), "steps"),
    "sampling-steps-float": (_set(("sampling", "decoder", "steps"), 2.5), "steps"),
    "sampling-steps-zero": (_set(("sampling", "prior", "steps"), 0), "steps"),
    "sampling-steps-huge": (_set(("sampling", "prior", "steps"), 10**12), "steps"),
    "sampling-eta-negative": (_set(("sampling", "decoder", "eta"), -1), "eta"),
    "sampling-guidance-string": (_set(("sampling", "prior", "guidance_scale"), "4"),
                                 "guidance_scale"),
    "sampling-best-of-zero": (_set(("sampling", "prior", "best_of"), 0), "best_of"),
    "sampling-clip-range-zero": (_set(("sampling", "decoder", "clip_range"), 0), "clip_range"),
    "sampling-super-res-dict": (_set(("sampling", "super_res"), {"size": 64}), "super_res"),
    "sampling-super-res-entry-int": (_set(("sampling", "super_res"), [3]), "super_res[0]"),
    "sampling-super-res-size-string": (_set(("sampling", "super_res"), [{"size": "big"}]),
                                       "size"),
    "sampling-models-string": (_set(("sampling", "super_res"), [{"models": "sr"}]), "models"),
    "sampling-top-p-two": (_set(("sampling", "ar_prior", "top_p"), 2.0), "top_p"),
    "mixed-decoder-clip-dim": (_set(("components", "decoder", "config", "clip_dim"), 128),
                               "not trained together"),
    "mixed-prior-embed-dim": (_set(("components", "prior", "config", "embed_dim"), 32),
                              "not trained together"),
    "decoder-named-class-clip": (_edit(lambda m: m["components"]["decoder"].update(
        {"class": "CLIP", "config": m["components"]["clip"]["config"]})), "uses 'decoder'"),
    "tokenizer-longer-than-clip": (_set(("tokenizer", "context_length"), 500), "longer"),
    "tokenizer-pad-beyond-vocab": (_set(("tokenizer", "pad_id"), 10**6), "vocab_size"),
}


def _inf_layer_norm(folder, tmp_path):
    m = _manifest(folder)
    m["components"]["prior"]["config"]["layer_norm_eps"] = "@INF@"
    _write_manifest(folder, json.dumps(m).replace('"@INF@"', "1e400"))


MANIFEST_CASES["config-float-inf"] = (_inf_layer_norm, "finite")


@pytest.mark.parametrize("case", sorted(MANIFEST_CASES))
def test_hostile_manifest_is_one_folder_error(pipe, tmp_path, case):
    damage, says = MANIFEST_CASES[case]
    folder = _copy(pipe, tmp_path)
    damage(folder, tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(FolderError) as e:
        pipeline_folder.load_component(folder, "prior")
    assert says.lower() in str(e.value).lower(), str(e.value)
    assert "\n" not in str(e.value)
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------------------------
# Safetensors files
# --------------------------------------------------------------------------------------------

def _raw_file(path):
    data = open(path, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _rewrite_header(edit):
    def damage(path):
        header, body = _raw_file(path)
        header = edit(header)
        head = (header if isinstance(header, bytes) else json.dumps(header).encode())
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(head)) + head + body)
    return damage


def _first(header):
    return next(k for k in sorted(header) if k != "__metadata__")


def _entry(key, value):
    def edit(h):
        h[_first(h)][key] = value
        return h
    return _rewrite_header(edit)


def _truncate(keep):
    def damage(path):
        data = open(path, "rb").read()
        open(path, "wb").write(data[:keep] if keep >= 0 else data[:keep])
    return damage


def _header_len(n):
    def damage(path):
        data = open(path, "rb").read()
        open(path, "wb").write(struct.pack("<Q", n) + data[8:])
    return damage


def _overlap(h):
    names = sorted(k for k in h if k != "__metadata__" and h[k]["data_offsets"][1]
                   > h[k]["data_offsets"][0])
    a, b = names[0], names[1]
    if h[a]["dtype"] == h[b]["dtype"] and h[a]["shape"] == h[b]["shape"]:
        h[b]["data_offsets"] = list(h[a]["data_offsets"])
    else:  # same size as b, starting where a starts
        size = h[b]["data_offsets"][1] - h[b]["data_offsets"][0]
        start = h[a]["data_offsets"][0]
        h[b]["data_offsets"] = [start, start + size]
    return h


def _swap_dtype(to):
    """A float tensor of prior.safetensors rewritten as an integer one of the same shape."""
    def damage(path):
        arrays = safetensors.read(path)
        name = sorted(arrays)[0]
        arrays[name] = np.zeros(arrays[name].shape, to)
        os.remove(path)
        safetensors.write(path, arrays)
    return damage


SAFETENSORS_CASES = {
    "st-empty-file": (_truncate(0), "shorter than"),
    "st-4-bytes": (_truncate(4), "shorter than"),
    "st-truncated-data": (_truncate(-7), "truncated"),
    "st-truncated-header": (_truncate(40), "truncated"),
    "st-header-len-huge": (_header_len(2**62), "header claims"),
    "st-header-len-beyond-file": (_header_len(10**6), "truncated"),
    "st-header-list": (_rewrite_header(lambda h: json.dumps([1, 2]).encode()), "JSON list"),
    "st-header-not-json": (_rewrite_header(lambda h: b"\x00\xffnot json"), "not JSON"),
    "st-header-nan": (_rewrite_header(lambda h: b'{"a": NaN}'), "not JSON"),
    "st-header-string": (_rewrite_header(lambda h: b'"hello"'), "JSON str"),
    "st-entry-list": (_rewrite_header(lambda h: {**h, _first(h): [1, 2]}), "needs 'dtype'"),
    "st-entry-lacks-offsets": (_rewrite_header(
        lambda h: {**h, _first(h): {"dtype": "F32", "shape": [1]}}), "needs 'dtype'"),
    "st-dtype-unknown": (_entry("dtype", "F8_E4M3"), "dtype"),
    "st-dtype-list": (_entry("dtype", ["F32"]), "dtype"),
    "st-shape-negative": (_entry("shape", [-1, 4]), "shape"),
    "st-shape-string": (_entry("shape", "4x4"), "shape"),
    "st-shape-float": (_entry("shape", [2.0]), "shape"),
    "st-shape-too-many-dims": (_entry("shape", [1] * 100), "shape"),
    "st-offsets-reversed": (_entry("data_offsets", [8, 0]), "data_offsets"),
    "st-offsets-three": (_entry("data_offsets", [0, 4, 8]), "data_offsets"),
    "st-offsets-wrong-size": (_entry("data_offsets", [0, 3]), "bytes"),
    "st-offsets-beyond-data": (_rewrite_header(lambda h: {**h, _first(h): {
        **h[_first(h)], "data_offsets": [10**9, 10**9 + h[_first(h)]["data_offsets"][1]
                                         - h[_first(h)]["data_offsets"][0]]}}), "truncated"),
    "st-overlap": (_rewrite_header(_overlap), "overlap"),
    "st-metadata-list": (_rewrite_header(lambda h: {**h, "__metadata__": [1]}), "__metadata__"),
    "st-metadata-int-value": (_rewrite_header(lambda h: {**h, "__metadata__": {"a": 1}}),
                              "__metadata__"),
    "st-int-in-float-param": (_swap_dtype(np.int32), "never cast"),
    "st-bool-in-float-param": (_swap_dtype(np.bool_), "never cast"),
    "st-uint8-in-float-param": (_swap_dtype(np.uint8), "never cast"),
}


@pytest.mark.parametrize("case", sorted(SAFETENSORS_CASES))
def test_hostile_safetensors_is_one_folder_error(pipe, tmp_path, case):
    damage, says = SAFETENSORS_CASES[case]
    folder = _copy(pipe, tmp_path)
    weights = os.path.join(folder, "prior.safetensors")
    damage(weights)
    before = snapshot(tmp_path)
    with pytest.raises(UserError) as e:
        pipeline_folder.load_component(folder, "prior")
    msg = str(e.value)
    assert says.lower() in msg.lower(), msg
    assert "prior.safetensors" in msg and "\n" not in msg
    assert snapshot(tmp_path) == before


def test_integer_buffer_stored_as_float_is_refused(pipe, tmp_path):
    folder = _copy(pipe, tmp_path)
    path = os.path.join(folder, "ar_prior.safetensors")
    arrays = safetensors.read(path)
    ints = [n for n, a in arrays.items() if np.issubdtype(a.dtype, np.integer)]
    assert ints
    arrays[ints[0]] = arrays[ints[0]].astype(np.float32)
    os.remove(path)
    safetensors.write(path, arrays)
    with pytest.raises(FolderError, match=f"{ints[0]}.*never cast"):
        pipeline_folder.load_component(folder, "ar_prior")


def test_narrower_float_storage_still_loads(pipe, tmp_path):
    folder = _copy(pipe, tmp_path)
    path = os.path.join(folder, "prior.safetensors")
    arrays = {n: (a.astype(np.float16) if a.dtype == np.float32 else a)
              for n, a in safetensors.read(path).items()}
    os.remove(path)
    safetensors.write(path, arrays)
    prior = pipeline_folder.load_component(folder, "prior")
    assert prior is not None


def test_safetensors_reader_refuses_damage_by_name(tmp_path):
    path = tmp_path / "x.safetensors"
    safetensors.write(path, {"a": np.ones((2, 2), np.float32), "b": np.zeros(4, np.float32)})
    _rewrite_header(_overlap)(str(path))
    with pytest.raises(safetensors.SafetensorsError, match="x.safetensors.*overlap"):
        safetensors.read(path)


# --------------------------------------------------------------------------------------------
# The CLI on damaged pipeline folders: one line, exit 2
# --------------------------------------------------------------------------------------------

CLI_CASES = ["weights-dotdot", "weights-int", "manifest-is-a-list", "sampling-steps-many",
             "weights-symlink-out", "config-int-string"]


@pytest.mark.parametrize("case", CLI_CASES)
def test_generate_on_a_damaged_folder_is_one_line(pipe, tmp_path, capsys, case):
    damage, says = MANIFEST_CASES[case]
    folder = _copy(pipe, tmp_path)
    damage(folder, tmp_path)
    assert_refused(capsys, ["generate", "--checkpoint", folder, "--prompt", "a red circle",
                            "--out", tmp_path / "imgs"], says=says, keep=[tmp_path])
    assert not (tmp_path / "imgs").exists()


@pytest.mark.parametrize("case", ["st-truncated-data", "st-header-list", "st-int-in-float-param"])
def test_generate_on_damaged_weights_is_one_line(pipe, tmp_path, capsys, case):
    damage, says = SAFETENSORS_CASES[case]
    folder = _copy(pipe, tmp_path)
    damage(os.path.join(folder, "prior.safetensors"))
    assert_refused(capsys, ["generate", "--checkpoint", folder, "--prompt", "a red circle",
                            "--out", tmp_path / "imgs"], says=says, keep=[tmp_path])


# --------------------------------------------------------------------------------------------
# Writing folders: save_pretrained / save_folder_atomically keep what is not ours
# --------------------------------------------------------------------------------------------

def _user_files(folder):
    os.makedirs(os.path.join(folder, "mine"), exist_ok=True)
    with open(os.path.join(folder, "notes.txt"), "w") as f:
        f.write("my notes")
    with open(os.path.join(folder, "mine", "data.bin"), "wb") as f:
        f.write(b"\x00\x01")
    return [os.path.join(folder, "notes.txt"), os.path.join(folder, "mine")]


def _prior_only(folder):
    """A write function putting only the prior (from ``folder``) into a fresh manifest."""
    module = pipeline_folder.load_component(folder, "prior")
    return lambda d: pipeline_folder.save_component(d, "prior", module)


def test_replacing_a_pipeline_keeps_user_files_and_drops_stale_weights(pipe, tmp_path):
    folder = _copy(pipe, tmp_path)
    keep = _user_files(folder)
    before = snapshot(*keep)
    pipeline_folder.save_folder_atomically(folder, _prior_only(pipe))
    assert snapshot(*keep) == before
    assert sorted(pipeline_folder.read_manifest(folder)["components"]) == ["prior"]
    assert not os.path.exists(os.path.join(folder, "decoder.safetensors"))  # ours, stale
    assert not [n for n in os.listdir(folder) if n.startswith(".")]
    pipeline_folder.load_component(folder, "prior")


def test_replacing_needs_overwrite_when_asked(pipe, tmp_path):
    folder = _copy(pipe, tmp_path)
    before = snapshot(folder)
    with pytest.raises(FolderError, match="overwrite"):
        pipeline_folder.save_folder_atomically(folder, lambda d: None, overwrite=False)
    assert snapshot(folder) == before


def test_a_user_file_with_our_name_is_never_replaced(pipe, tmp_path):
    folder = _copy(pipe, tmp_path)
    m = _manifest(folder)
    del m["components"]["prior"]
    _write_manifest(folder, m)   # prior.safetensors is now not listed: not ours
    before = snapshot(folder)
    with pytest.raises(FolderError, match="does not list"):
        pipeline_folder.save_folder_atomically(folder, _prior_only(pipe))
    assert snapshot(folder) == before
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


@pytest.mark.parametrize("target", ["file", "non-pipeline-folder", "damaged-manifest"])
def test_writing_over_what_is_not_ours_is_refused(pipe, tmp_path, target):
    out = tmp_path / "out"
    if target == "file":
        out.write_text("a file")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        if target == "damaged-manifest":
            (out / "unclip.json").write_text("[not json")
    before = snapshot(tmp_path)
    with pytest.raises(FolderError):
        pipeline_folder.save_folder_atomically(out, lambda d: None)
    assert snapshot(tmp_path) == before


def test_interrupted_switch_leaves_the_old_pipeline_loadable(pipe, tmp_path, monkeypatch):
    """Kill the save right before the new manifest is renamed in: the folder's manifest then
    points at backups of the old weights, so the old pipeline still loads, bit for bit."""
    folder = _copy(pipe, tmp_path)
    keep = _user_files(folder)
    before = snapshot(*keep)
    old = pipeline_folder.module_tensors(pipeline_folder.load_component(folder, "prior"))
    from flax import nnx

    from unclip_jax.models.diffusion_prior import DiffusionPrior
    cfg = pipeline_folder.config_from_dict("DiffusionPrior",
                                           _manifest(folder)["components"]["prior"]["config"],
                                           "test")
    new = pipeline_fixtures.materialise(lambda: DiffusionPrior(cfg, rngs=nnx.Rngs(0)), 99)
    real = os.replace

    def dying(src, dst):   # the new manifest moving from the temporary folder into place
        if dst == os.path.join(folder, "unclip.json") and os.path.dirname(src) != folder:
            raise KeyboardInterrupt("killed")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", dying)
    with pytest.raises(KeyboardInterrupt):
        pipeline_folder.save_folder_atomically(
            folder, lambda d: pipeline_folder.save_component(d, "prior", new))
    monkeypatch.setattr(os, "replace", real)
    assert any(n.endswith(".old") for n in os.listdir(folder))   # killed mid-switch indeed
    got = pipeline_folder.module_tensors(pipeline_folder.load_component(folder, "prior"))
    assert got.keys() == old.keys()
    for k in old:
        np.testing.assert_array_equal(got[k], old[k])
    pipeline_folder.load_component(folder, "decoder")
    assert snapshot(*keep) == before
    # the next save completes the switch and cleans up
    pipeline_folder.save_folder_atomically(
        folder, lambda d: pipeline_folder.save_component(d, "prior", new))
    got = pipeline_folder.module_tensors(pipeline_folder.load_component(folder, "prior"))
    want = pipeline_folder.module_tensors(new)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    assert snapshot(*keep) == before
    assert not [n for n in os.listdir(folder) if n.startswith(".")]


# --------------------------------------------------------------------------------------------
# export: components are added; an existing one needs --overwrite; user files survive
# --------------------------------------------------------------------------------------------

@pytest.fixture
def fake_export(pipe, monkeypatch):
    """export_workdir with a 'trained' decoder (the pipeline's) instead of a real workdir."""
    import ml_collections

    from unclip_jax.train import to_pipeline
    dec = pipeline_folder.load_component(pipe, "decoder")
    cfg = ml_collections.ConfigDict({"stage": "decoder", "diffusion": {
        "prediction_type": "epsilon"}})
    monkeypatch.setattr(to_pipeline, "load_trained", lambda *a, **k: (dec, cfg, 7))
    return to_pipeline.export_workdir


def test_export_adds_a_component_and_keeps_user_files(pipe, tmp_path, fake_export):
    folder = _copy(pipe, tmp_path)
    keep = _user_files(folder) + [os.path.join(folder, "prior.safetensors")]
    before = snapshot(*keep)
    fake_export("run", folder, "decoder2", overwrite=False)
    assert snapshot(*keep) == before
    comps = pipeline_folder.read_manifest(folder)["components"]
    assert {"prior", "decoder", "decoder2", "clip"} <= set(comps)
    pipeline_folder.load_component(folder, "decoder2")
    pipeline_folder.load_component(folder, "prior")


def test_export_over_an_existing_component_needs_overwrite(pipe, tmp_path, fake_export):
    folder = _copy(pipe, tmp_path)
    keep = _user_files(folder)
    before = snapshot(folder)
    with pytest.raises(FolderError, match="--overwrite"):
        fake_export("run", folder, "decoder", overwrite=False)
    assert snapshot(folder) == before
    fake_export("run", folder, "decoder", overwrite=True)
    assert {k: v for k, v in snapshot(*keep).items()} == {
        k: v for k, v in before.items() if "notes" in k or "mine" in k}
    pipeline_folder.load_component(folder, "decoder")


@pytest.mark.parametrize("kind", ["non-pipeline", "user-weights-name", "bad-name"])
def test_export_refuses_before_loading(tmp_path, fake_export, monkeypatch, kind):
    from unclip_jax.train import to_pipeline
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    name = "decoder"
    if kind == "user-weights-name":
        (out / "unclip.json").write_text(json.dumps(
            {"format": "unclip-jax-pipeline", "version": 1, "components": {}}))
        (out / "decoder.safetensors").write_bytes(b"my own file")
    if kind == "bad-name":
        name = "../evil"
    monkeypatch.setattr(to_pipeline, "load_trained",
                        lambda *a, **k: pytest.fail("loaded before checking --out"))
    before = snapshot(tmp_path)
    with pytest.raises(UserError):
        to_pipeline.export_workdir("run", str(out), name, overwrite=True)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("kind", ["missing", "file", "empty-folder"])
def test_export_cli_bad_workdir_is_one_line(tmp_path, capsys, kind):
    work = tmp_path / "work"
    if kind == "file":
        work.write_text("x")
    elif kind == "empty-folder":
        work.mkdir()
    assert_refused(capsys, ["export", "--workdir", work, "--out", tmp_path / "o"],
                   says=("workdir" if kind != "empty-folder" else "checkpoints"),
                   keep=[tmp_path])
    assert not (tmp_path / "o").exists()
    if kind == "empty-folder":
        assert os.listdir(work) == []   # nothing created there


# --------------------------------------------------------------------------------------------
# convert: hostile diffusers sources (refused before anything is written)
# --------------------------------------------------------------------------------------------

def _json_edit(rel, fn):
    def damage(src, tmp_path):
        path = os.path.join(src, rel)
        with open(path) as f:
            value = json.load(f)
        value = fn(value)
        with open(path, "w") as f:
            f.write(value if isinstance(value, str) else json.dumps(value))
    return damage


def _json_set(rel, key, value):
    def fn(d):
        d[key] = value
        return d
    return _json_edit(rel, fn)


def _link_out(rel):
    def damage(src, tmp_path):
        path = os.path.join(src, rel)
        outside = tmp_path / ("outside_" + os.path.basename(rel))
        shutil.move(path, outside)
        os.symlink(outside, path)
    return damage


def _index(shard):
    def damage(src, tmp_path):
        folder = os.path.join(src, "prior")
        index = {"metadata": {}, "weight_map": {"clip_mean": shard}}
        with open(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json"),
                  "w") as f:
            json.dump(index, f)
    return damage


def _int_prior_tensor(src, tmp_path):
    path = os.path.join(src, "prior", "diffusion_pytorch_model.safetensors")
    arrays = safetensors.read(path)
    name = "clip_mean" if "clip_mean" in arrays else sorted(arrays)[0]
    arrays[name] = np.zeros(arrays[name].shape, np.int32)
    os.remove(path)
    safetensors.write(path, arrays)


def _pickle_only(src, tmp_path):
    import torch
    folder = os.path.join(src, "super_res_last")
    st = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    torch.save({n: torch.from_numpy(np.asarray(a)) for n, a in safetensors.read(st).items()},
               os.path.join(folder, "diffusion_pytorch_model.bin"))
    os.remove(st)


SOURCE_CASES = {
    "src-model-index-invalid": (_json_edit("model_index.json", lambda d: "{oops"),
                                "not valid JSON"),
    "src-model-index-list": (_json_edit("model_index.json", lambda d: [d]), "JSON object"),
    "src-model-index-other-class": (_json_set("model_index.json", "_class_name",
                                              "StableDiffusionPipeline"), "UnCLIPPipeline"),
    "src-prior-config-invalid": (_json_edit("prior/config.json", lambda d: "[1,"),
                                 "not valid JSON"),
    "src-prior-config-list": (_json_edit("prior/config.json", lambda d: [1]), "JSON object"),
    "src-prior-layers-string": (_json_set("prior/config.json", "num_layers", "many"),
                                "num_layers"),
    "src-prior-layers-huge": (_json_set("prior/config.json", "num_layers", 10**9),
                              "num_layers"),
    "src-prior-heads-float": (_json_set("prior/config.json", "num_attention_heads", 2.5),
                              "num_attention_heads"),
    "src-prior-embedding-string": (_json_set("prior/config.json", "embedding_dim", "32"),
                                   "embed"),
    "src-text-config-layers-string": (_json_set("text_encoder/config.json",
                                                "num_hidden_layers", "two"),
                                      "num_hidden_layers"),
    "src-text-layers-huge": (_json_set("text_encoder/config.json", "num_hidden_layers", 10**9),
                             "num_hidden_layers"),
    "src-text-eps-string": (_json_set("text_encoder/config.json", "layer_norm_eps", "small"),
                            "layer_norm_eps"),
    "src-decoder-sample-size-string": (_json_set("decoder/config.json", "sample_size", "big"),
                                       "sample_size"),
    "src-sr-sample-size-bool": (_json_set("super_res_first/config.json", "sample_size", True),
                                "sample_size"),
    "src-scheduler-steps-string": (_json_set("decoder_scheduler/scheduler_config.json",
                                             "num_train_timesteps", "many"),
                                   "num_train_timesteps"),
    "src-scheduler-range-nan": (_json_edit("prior_scheduler/scheduler_config.json",
                                           lambda d: json.dumps(d).replace(
                                               '"clip_sample_range": 5.0',
                                               '"clip_sample_range": NaN')),
                                "clip_sample_range"),
    "src-scheduler-range-negative": (_json_set("prior_scheduler/scheduler_config.json",
                                               "clip_sample_range", -1), "clip_sample_range"),
    "src-scheduler-variance-other": (_json_set("decoder_scheduler/scheduler_config.json",
                                               "variance_type", "fixed_large"),
                                     "variance_type"),
    "src-scheduler-list": (_json_edit("decoder_scheduler/scheduler_config.json",
                                      lambda d: [d]), "JSON object"),
    "src-tokenizer-config-list": (_json_edit("tokenizer/tokenizer_config.json",
                                             lambda d: [d]), "JSON object"),
    "src-weights-symlink-out": (_link_out("prior/diffusion_pytorch_model.safetensors"),
                                "symlink"),
    "src-config-symlink-out": (_link_out("prior/config.json"), "symlink"),
    "src-component-folder-symlink-out": (_link_out("decoder"), "symlink"),
    "src-model-index-symlink-out": (_link_out("model_index.json"), "symlink"),
    "src-index-shard-dotdot": (_index("../../outside.safetensors"), "leaves the folder"),
    "src-index-shard-absolute": (_index("/etc/passwd"), "absolute"),
    "src-index-shard-int": (_index(5), "not a string"),
    "src-int-tensor-in-float-param": (_int_prior_tensor, "never cast"),
    "src-pickle-without-allow": (_pickle_only, "--allow-pickle"),
}


@pytest.mark.parametrize("case", sorted(SOURCE_CASES))
def test_hostile_diffusers_source_is_one_line(karlo, tmp_path, capsys, case):
    damage, says = SOURCE_CASES[case]
    src = _copy(karlo, tmp_path, "src")
    damage(src, tmp_path)
    out = tmp_path / "out"
    assert_refused(capsys, ["convert", "--from", "diffusers", src, "--out", out], says=says,
                   keep=[tmp_path])
    assert not out.exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


# --------------------------------------------------------------------------------------------
# convert --out: nothing lost
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def converted(karlo, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "ours"
    from unclip_jax import cli
    assert cli.main(["convert", karlo, "--out", str(out)]) == 0
    return str(out)


@pytest.mark.parametrize("kind", ["non-pipeline-folder", "file", "pipeline-no-overwrite",
                                  "damaged-manifest", "user-file-with-our-name",
                                  "same-as-source", "parent-is-file"])
def test_convert_out_refused_before_work(karlo, converted, tmp_path, capsys, kind):
    out = tmp_path / "out"
    says = "--out"
    src = karlo
    if kind == "non-pipeline-folder":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        says = "not an unclip-jax pipeline folder"
    elif kind == "file":
        out.write_text("a file")
        says = "not a folder"
    elif kind == "pipeline-no-overwrite":
        shutil.copytree(converted, out)
        _user_files(str(out))
        says = "--overwrite"
    elif kind == "damaged-manifest":
        out.mkdir()
        (out / "unclip.json").write_text("{")
        (out / "notes.txt").write_text("mine")
        says = "damaged"
    elif kind == "user-file-with-our-name":
        shutil.copytree(converted, out)
        m = _manifest(str(out))
        del m["components"]["prior"]
        _write_manifest(str(out), m)
        says = "prior.safetensors"
    elif kind == "same-as-source":
        src = _copy(karlo, tmp_path, "src")
        out = src
        says = "refusing"
    elif kind == "parent-is-file":
        (tmp_path / "f").write_text("x")
        out = tmp_path / "f" / "out"
        says = "is a file"
    argv = ["convert", src, "--out", out] + (
        ["--overwrite"] if kind in ("user-file-with-our-name", "same-as-source") else [])
    assert_refused(capsys, argv, says=says, keep=[tmp_path])


def test_convert_overwrite_keeps_user_files(karlo, converted, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(converted, out)
    m = _manifest(str(out))
    m["components"]["extra"] = dict(m["components"]["prior"], weights="extra.safetensors")
    shutil.copy(out / "prior.safetensors", out / "extra.safetensors")
    _write_manifest(str(out), m)   # an extra component of ours, which the new one lacks
    keep = _user_files(str(out))
    before = snapshot(*keep)
    rc, _, err = run_cli(capsys, ["convert", karlo, "--out", out, "--overwrite"])
    assert rc == 0, err
    assert snapshot(*keep) == before
    assert not (out / "extra.safetensors").exists()
    assert "extra" not in pipeline_folder.read_manifest(out)["components"]
    assert not [n for n in os.listdir(out) if n.startswith(".")]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]
    from unclip_jax.pipeline import UnCLIPPipeline
    UnCLIPPipeline.from_pretrained(str(out))


def test_convert_into_an_empty_folder(karlo, tmp_path, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    rc, _, err = run_cli(capsys, ["convert", karlo, "--out", out])
    assert rc == 0, err
    assert (out / "unclip.json").is_file()


def test_hf_cache_snapshot_links_are_followed(karlo, tmp_path):
    """A Hub cache snapshot is a folder of symlinks into ../../blobs: that is not 'out'."""
    from unclip_jax.convert.diffusers_pipeline import convert_diffusers_pipeline
    repo = tmp_path / "models--x--karlo"
    snap = repo / "snapshots" / "abc123"
    blobs = repo / "blobs"
    blobs.mkdir(parents=True)
    for root, _, files in os.walk(karlo):
        rel = os.path.relpath(root, karlo)
        os.makedirs(snap / rel, exist_ok=True)
        for f in files:
            blob = blobs / f"{rel.replace(os.sep, '_')}_{f}"
            shutil.copy(os.path.join(root, f), blob)
            os.symlink(os.path.relpath(blob, snap / rel), snap / rel / f)
    report = convert_diffusers_pipeline(str(snap), str(tmp_path / "out"))
    assert "prior" in report["components"]


def test_export_of_a_mismatched_component_is_refused_untouched(pipe, tmp_path, monkeypatch):
    """A prior of another embedding width cannot become the pipeline's 'prior' (the folder
    would no longer sample); under another name it is kept alongside."""
    import ml_collections
    from flax import nnx

    from unclip_jax.models.diffusion_prior import DiffusionPrior, PriorConfig
    from unclip_jax.train import to_pipeline
    other = pipeline_fixtures.materialise(lambda: DiffusionPrior(PriorConfig(
        embed_dim=32, context_length=77, num_heads=2, head_dim=16, num_layers=1,
        embed_norm="mean_std"), rngs=nnx.Rngs(0)), 5)
    cfg = ml_collections.ConfigDict({"stage": "diffusion_prior"})
    monkeypatch.setattr(to_pipeline, "load_trained", lambda *a, **k: (other, cfg, 3))
    folder = _copy(pipe, tmp_path)
    _user_files(folder)
    before = snapshot(tmp_path)
    with pytest.raises(FolderError, match="not trained together"):
        to_pipeline.export_workdir("run", folder, "prior", overwrite=True)
    assert snapshot(tmp_path) == before
    to_pipeline.export_workdir("run", folder, "prior_small", overwrite=False)
    assert pipeline_folder.load_component(folder, "prior_small").config.embed_dim == 32
    pipeline_folder.load_component(folder, "prior")


@pytest.mark.parametrize("claimed", ["notes.txt", ".notes.txt.0123abcd.old"])
def test_a_manifest_claiming_a_user_file_cannot_get_it_deleted(pipe, tmp_path, claimed):
    folder = _copy(pipe, tmp_path)
    keep = _user_files(folder)
    m = _manifest(folder)
    m["components"]["junk"] = dict(m["components"]["prior"], weights=claimed)
    _write_manifest(folder, m)
    if claimed.startswith("."):
        shutil.copy(os.path.join(folder, "notes.txt"), os.path.join(folder, claimed))
        keep.append(os.path.join(folder, claimed))
    before = snapshot(*keep)
    try:
        pipeline_folder.save_folder_atomically(folder, _prior_only(pipe))
    except UserError:
        pass
    assert snapshot(*keep) == before


@pytest.mark.parametrize("config, says", [
    ({"model_type": "clip", "text_config": {"num_hidden_layers": 10**9}, "vision_config": {}},
     "more than 4096 layers"),
    ({"model_type": "clip", "text_config": [1], "vision_config": {}}, "must be an object"),
    ({"model_type": "clip", "text_config": {"hidden_size": "wide"}, "vision_config": {}},
     "text_width"),
    ({"model_type": "clip", "text_config": {}, "vision_config": {"layer_norm_eps": None}},
     "layer_norm_eps"),
])
def test_hostile_hf_clip_config_is_one_checkpoint_error(config, says):
    from unclip_jax.convert import hf_clip
    from unclip_jax.torch_weights import CheckpointError
    with pytest.raises(CheckpointError, match=says):
        hf_clip.config_from_hf(config)


@pytest.mark.parametrize("config, says", [
    ({"num_layers": 10**6}, "more than 4096 layers"),
    ({"num_attention_heads": "2"}, "num_heads"),
    ({"embedding_dim": -3}, "embed_dim"),
    ({"dropout": "none"}, "dropout"),
    ({"_class_name": "UNet2DModel"}, "not a PriorTransformer"),
])
def test_hostile_diffusers_prior_config_is_one_checkpoint_error(config, says):
    from unclip_jax.convert.diffusers_prior import config_from_diffusers
    from unclip_jax.torch_weights import CheckpointError
    with pytest.raises(CheckpointError, match=says):
        config_from_diffusers({"additional_embeddings": 4, **config})
