"""Shapes caption retrieval from CLIP image embeddings (unclip_jax.evaluate.clip_retrieval) and
its command. The chain of tests/test_documented_commands.py runs the command on a trained CLIP
workdir (configs/shapes.py's recipe)."""
import numpy as np
import pytest

from pipeline_fixtures import tiny_pipeline
from unclip_jax import cli
from unclip_jax.data.shapes import CaptionParseError
from unclip_jax.evaluate import clip_retrieval as cr

LEFT = "a red circle to the left of a blue square"
MIRROR = "a blue square to the right of a red circle"
SWAPPED = "a blue square to the left of a red circle"
ABOVE = "a green triangle above a yellow circle"
BELOW = "a yellow circle below a green triangle"
ONE = "a small red circle at the top left"


def test_scene_class_mirror_images_are_one_scene():
    assert cr.scene_class(LEFT) == cr.scene_class(MIRROR)
    assert cr.scene_class(ABOVE) == cr.scene_class(BELOW)
    assert cr.scene_class(LEFT) != cr.scene_class(SWAPPED)
    assert cr.scene_class(ABOVE) != cr.scene_class("a yellow circle above a green triangle")
    assert cr.scene_class(ONE) == ("one", ("red", "circle"), "small", "top left")
    assert cr.scene_class(ONE) != cr.scene_class("a large red circle at the top left")
    with pytest.raises(CaptionParseError):
        cr.scene_class("a red frog")


def test_retrieval_scores_count_mirrors_right_and_swaps_wrong():
    candidates = [LEFT, MIRROR, SWAPPED, ABOVE, ONE]
    text = np.eye(5)
    # images: LEFT retrieves its mirror (right), SWAPPED retrieves LEFT (wrong, swapped),
    # ABOVE retrieves SWAPPED (wrong, other objects), ONE retrieves itself (right)
    images = np.stack([text[1], text[0], text[2] + 0.1 * text[4], text[4]])
    s = cr.retrieval_scores(images, [LEFT, SWAPPED, ABOVE, ONE], text, candidates)
    assert s["one"] == 1.0 and s["one/count"] == 1 and s["two/count"] == 3
    assert s["two"] == pytest.approx(1 / 3)
    assert s["two/same_objects"] == pytest.approx(2 / 3)   # LEFT and SWAPPED name red+blue
    assert s["two/swapped"] == pytest.approx(1 / 3)        # SWAPPED got LEFT
    assert s["candidates"] == 5
    with pytest.raises(cr.RetrievalError, match="one caption per image"):
        cr.retrieval_scores(images, [LEFT], text, candidates)
    with pytest.raises(cr.RetrievalError, match="one text embedding per candidate"):
        cr.retrieval_scores(images, [LEFT, SWAPPED, ABOVE, ONE], text[:2], candidates)


def test_shapes_retrieval_of_a_pipeline_clip_and_the_command(tmp_path, capsys):
    from unclip_jax.clip.tokenizer import get_tokenizer
    from unclip_jax.pipeline import UnCLIPPipeline
    folder = tiny_pipeline(tmp_path / "pipe")
    pipe = UnCLIPPipeline.from_pretrained(str(folder))
    s = cr.shapes_retrieval(pipe.clip, get_tokenizer(pipe.tokenizer.context_length), n=12,
                            batch_size=5)
    assert s["one/count"] + s["two/count"] == 12 and 0 <= s["one"] <= 1 and 0 <= s["two"] <= 1
    out = tmp_path / "r.md"
    assert cli.main(["clip-retrieval", "--clip", str(folder), "--num-examples", "12",
                     "--batch-size", "5", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| model | one-object | two-object" in text and "12 test examples" in text
    assert f"{s['one']:.3f} | {s['two']:.3f}" in text      # the command's row is the function's
    # refused before anything runs: --steps without a workdir, an existing --out
    assert cli.main(["clip-retrieval", "--clip", str(folder), "--steps", "5"]) == 2
    assert "--steps needs --clip to be a CLIP training workdir" in capsys.readouterr().err
    assert cli.main(["clip-retrieval", "--clip", str(folder), "--out", str(out)]) == 2
    assert out.read_text() == text
