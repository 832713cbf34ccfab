"""`unclip-jax convert --from diffusers` and `unclip-jax generate`: every tensor accounted for
(missing / unexpected refused by name, nothing written), pickles only with --allow-pickle, and
the generate command's files and errors."""
import os
import shutil

import numpy as np
import pytest
import torch

from torch_reference import D, build_tiny_karlo, random_prior
from unclip_jax import cli
from unclip_jax.convert.diffusers_pipeline import ConvertError, convert_diffusers_pipeline
from unclip_jax.io.safetensors import TensorFiles, write


@pytest.fixture(scope="module")
def karlo(tmp_path_factory):
    src = tmp_path_factory.mktemp("karlo_src") / "karlo"
    build_tiny_karlo(str(src), seed=4)
    return src


def _copy(src, tmp_path):
    dst = tmp_path / "src"
    shutil.copytree(src, dst)
    return dst


def _edit(file, drop=None, add=None):
    t = TensorFiles([str(file)])
    arrays = {n: np.asarray(t.read(n)) for n in t.names() if n != drop}
    if add:
        arrays[add] = np.zeros((3,), np.float32)
    os.remove(file)
    write(str(file), arrays)


def test_missing_and_unexpected_tensors_are_refused_by_name(karlo, tmp_path):
    src = _copy(karlo, tmp_path)
    _edit(src / "prior" / "diffusion_pytorch_model.safetensors", drop="clip_std")
    with pytest.raises(ConvertError) as e:
        convert_diffusers_pipeline(src, tmp_path / "out")
    assert e.value.missing == ["clip_std"] and "Component prior/" in str(e.value)
    assert not (tmp_path / "out").exists()

    src = _copy(karlo, tmp_path / "b")
    _edit(src / "decoder" / "diffusion_pytorch_model.safetensors", add="conv_out.extra")
    with pytest.raises(ConvertError) as e:
        convert_diffusers_pipeline(src, tmp_path / "out")
    assert e.value.unexpected == ["decoder.conv_out.extra"]
    assert not (tmp_path / "out").exists()


def test_pickled_weights_need_allow_pickle(karlo, tmp_path):
    src = _copy(karlo, tmp_path)
    folder = src / "super_res_last"
    st = folder / "diffusion_pytorch_model.safetensors"
    t = TensorFiles([str(st)])
    torch.save({n: torch.from_numpy(np.asarray(t.read(n))) for n in t.names()},
               folder / "diffusion_pytorch_model.bin")
    os.remove(st)
    with pytest.raises(ConvertError, match="--allow-pickle"):
        convert_diffusers_pipeline(src, tmp_path / "out")
    report = convert_diffusers_pipeline(src, tmp_path / "out", allow_pickle=True)
    assert "super_res_last" in report["components"]
    convert_diffusers_pipeline(karlo, tmp_path / "ref")
    a = TensorFiles([str(tmp_path / "out" / "super_res_last.safetensors")])
    b = TensorFiles([str(tmp_path / "ref" / "super_res_last.safetensors")])
    assert a.names() == b.names()
    for n in a.names():
        np.testing.assert_array_equal(a.read(n), b.read(n))


def test_prior_predicting_other_than_an_embedding_is_refused(karlo, tmp_path):
    src = _copy(karlo, tmp_path)
    shutil.rmtree(src / "prior")
    random_prior(num_attention_heads=2, attention_head_dim=8, num_layers=2, embedding_dim=D,
                 num_embeddings=77, clip_embed_dim=2 * D).save_pretrained(src / "prior")
    with pytest.raises(ConvertError, match=f"clip_embed_dim={2 * D} but embedding_dim={D}"):
        convert_diffusers_pipeline(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_convert_then_generate_cli(karlo, tmp_path, capsys):
    out = tmp_path / "ours"
    assert cli.main(["convert", "--from", "diffusers", str(karlo), "--out", str(out)]) == 0
    assert "every tensor mapped" in capsys.readouterr().out
    imgs = tmp_path / "imgs"
    args = ["generate", "--checkpoint", str(out), "--prompt", "a red circle", "--num-images",
            "2", "--out", str(imgs), "--prior-steps", "2", "--decoder-steps", "2",
            "--super-res-steps", "2"]
    assert cli.main(args) == 0
    assert sorted(os.listdir(imgs)) == ["0_0.png", "0_1.png", "grid.png"]
    from PIL import Image
    assert Image.open(imgs / "0_0.png").size == (16, 16)
    assert Image.open(imgs / "grid.png").size == (32, 16)


def test_generate_errors_are_one_line(tmp_path, capsys, monkeypatch):
    import unclip_jax.assets
    monkeypatch.setattr(unclip_jax.assets, "SHAPES", str(tmp_path / "no_bundle"))
    assert cli.main(["generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "unclip.json").write_text("{}")
    assert cli.main(["generate", "--checkpoint", str(tmp_path), "--prompt", " "]) == 2
    assert "is empty" in capsys.readouterr().err
    assert cli.main(["generate", "--prompt", "a red circle"]) == 2
    err = capsys.readouterr().err
    assert "bundled Shapes model is missing" in err and "--checkpoint" in err
    assert cli.main(["convert", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
