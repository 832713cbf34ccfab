"""colabs/unclip_shapes.ipynb runs headless: its code cells are executed in order in one
namespace (shell lines such as `!pip ...` become `pass`), with the settings cell's step counts
lowered. It runs against the bundled Shapes model when it ships with the package, else against a
tiny random pipeline folder given through UNCLIP_SHAPES_CHECKPOINT."""
import json
import os

import numpy as np
from pipeline_fixtures import tiny_pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "colabs", "unclip_shapes.ipynb")
FAST = dict(NUM_IMAGES=2, PRIOR_STEPS=2, DECODER_STEPS=2, SUPER_RES_STEPS=2, APP_STEPS=2,
            REFINE_ITERS=0, NUM_VARIATIONS=3, NUM_FRAMES=3, THETAS=(0.0, 0.25, 0.5),
            INTERPOLATION_MODE="fixed", EVAL_CAPTIONS=4)


def _code_cells():
    with open(NOTEBOOK, encoding="utf-8") as f:
        nb = json.load(f)
    assert nb["nbformat"] == 4
    cells = []
    for cell in nb["cells"]:
        assert cell["cell_type"] in ("code", "markdown") and "metadata" in cell
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, "saved clean"
            cells.append("".join(cell["source"]))
    return cells


def _python(source: str) -> str:
    """IPython shell / magic lines -> `pass` at the same indentation."""
    out = []
    for line in source.splitlines():
        stripped = line.lstrip()
        out.append(line[:len(line) - len(stripped)] + "pass" if stripped[:1] in "!%"
                   and stripped else line)
    return "\n".join(out) + "\n"


def test_notebook_runs_headless(tmp_path, monkeypatch):
    from unclip_jax.assets import SHAPES as BUNDLED_SHAPES
    cells = _code_cells()
    sources = "\n".join(cells)
    # The notebook calls the library rather than copying it: its one helper displays a grid.
    assert "from unclip_jax import applications" in sources and "shapes_eval." in sources
    assert [line.split("(")[0] for line in sources.splitlines() if line.startswith("def ")] == \
        ["def show"]
    settings = [i for i, c in enumerate(cells) if c.startswith("# Settings")]
    assert len(settings) == 1, "one settings cell"
    assert set(FAST) <= set(compile(cells[settings[0]], "settings", "exec").co_names)

    bundled = os.path.isfile(os.path.join(BUNDLED_SHAPES, "unclip.json"))
    if bundled:
        monkeypatch.delenv("UNCLIP_SHAPES_CHECKPOINT", raising=False)
    else:
        monkeypatch.setenv("UNCLIP_SHAPES_CHECKPOINT", tiny_pipeline(tmp_path / "pipe"))

    ns = {"__name__": "__main__"}
    for i, cell in enumerate(cells):
        exec(compile(_python(cell), f"cell {i}", "exec"), ns)
        if i == settings[0]:
            ns.update(FAST)

    assert ns["path"] == (BUNDLED_SHAPES if bundled else str(tmp_path / "pipe"))
    n_prompts = len(ns["PROMPTS"])
    images = ns["images"]
    assert images.dtype == np.uint8 and images.shape[0] == n_prompts * 2
    size = images.shape[1:]
    # The image applications run wherever the pipeline has CLIP's image tower (the tiny one has).
    assert ns["HAS_IMAGE_TOWER"] == hasattr(ns["pipe"].clip, "encode_image")
    assert ns["HAS_IMAGE_TOWER"] or bundled
    if ns["HAS_IMAGE_TOWER"]:
        assert ns["var"].images.shape == (3,) + size
        assert ns["interp"].frames.shape == (3,) + size
        assert ns["td"].images.shape == (3,) + size and list(ns["td"].thetas) == [0.0, 0.25, 0.5]
    else:
        assert not {"var", "interp", "td"} & set(ns)
    summary = ns["summary"]
    assert summary["n"] == 4 * 2 and summary["one/n"] + summary["two/n"] == 8
    assert 0.0 <= summary["accuracy"] <= 1.0
