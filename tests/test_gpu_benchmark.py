"""benchmarks/gpu.py without a GPU: its variant grammar, and --check, which traces a variant's
train step on CPU so that the GPU minutes are not spent finding a broken one."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import gpu  # noqa: E402


def test_variants_parse_and_bad_ones_say_what_is_allowed():
    v = gpu.parse_variant("b32/remat=dots_saveable/attn=cudnn/flags=lhs")
    assert (v["batch"], v["remat"], v["remat_policy"], v["attention_impl"], v["flags"]) == \
        (32, True, "dots_saveable", "cudnn", "lhs")
    assert gpu.parse_variant("b8")["remat"] is False
    for bad, words in (("32", "b<batch>"), ("b0", "b<batch>"), ("b8/remat=all", "remat="),
                       ("b8/attn=flash", "attn="), ("b8/flags=fast", "flags=")):
        with pytest.raises(ValueError, match=words.replace("<", ".").replace(">", ".")):
            gpu.parse_variant(bad)
    for spec in gpu.DEFAULT_VARIANTS:
        gpu.parse_variant(spec)


def test_check_traces_a_variant_on_cpu(capsys):
    assert gpu.main(["--check", "--variants", "b4/remat=dots_saveable/attn=cudnn/flags=lhs",
                     "--sample-batch", "4,16"]) == 0
    out = capsys.readouterr().out
    assert "batch 4 and 16, steps 25/25/7" in out
    assert "Karlo sizes (abstract)" in out
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in out
    assert "traced: remat=True policy=dots_saveable" in out


def test_sample_batches_parse():
    assert gpu._batches("4,16") == (4, 16)
    for bad in ("0", "4,x", ""):
        with pytest.raises(Exception, match="positive batch sizes"):
            gpu._batches(bad)


def test_without_a_gpu_it_says_so(capsys):
    assert gpu.main(["--sweep"]) == 2
    assert "needs an NVIDIA GPU" in capsys.readouterr().err
