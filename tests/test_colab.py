"""colabs/unclip_shapes.ipynb: saved with the outputs of one top-to-bottom run (its pictures and
table read before it runs; scripts/execute_notebook.py refreshes them), and it runs headless here:
its code cells are executed in order in one namespace (shell and magic lines such as `%pip ...`
become `pass`), with the settings cell's step counts lowered and the Karlo cell skipped (offline).
It runs against the bundled Shapes model when it ships with the package, else against a tiny
random pipeline folder given through UNCLIP_SHAPES_CHECKPOINT."""
import base64
import io
import json
import os

import numpy as np
from PIL import Image
from pipeline_fixtures import tiny_pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "colabs", "unclip_shapes.ipynb")
FAST = dict(NUM_IMAGES=2, PRIOR_STEPS=2, DECODER_STEPS=2, SUPER_RES_STEPS=2, APP_STEPS=2,
            REFINE_ITERS=0, NUM_VARIATIONS=3, NUM_FRAMES=3, THETAS=(0.0, 0.25, 0.5),
            INTERPOLATION_MODE="fixed", EVAL_CAPTIONS=4)


def _notebook() -> dict:
    with open(NOTEBOOK, encoding="utf-8") as f:
        nb = json.load(f)
    assert nb["nbformat"] == 4
    for cell in nb["cells"]:
        assert cell["cell_type"] in ("code", "markdown") and "metadata" in cell
    return nb


def _code_cells(nb: dict) -> list:
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def _source(cell: dict) -> str:
    return "".join(cell["source"])


def _cell(nb: dict, text: str) -> dict:
    """The one code cell whose source contains ``text``."""
    found = [c for c in _code_cells(nb) if text in _source(c)]
    assert len(found) == 1, f"one code cell with {text!r}, found {len(found)}"
    return found[0]


def _pictures(cell: dict) -> list:
    return [Image.open(io.BytesIO(base64.b64decode(o["data"]["image/png"])))
            for o in cell["outputs"] if "image/png" in o.get("data", {})]


def _python(source: str) -> str:
    """IPython shell / magic lines -> `pass` at the same indentation."""
    out = []
    for line in source.splitlines():
        stripped = line.lstrip()
        out.append(line[:len(line) - len(stripped)] + "pass" if stripped[:1] in "!%"
                   and stripped else line)
    return "\n".join(out) + "\n"


def test_install_and_karlo_cells():
    nb = _notebook()
    install = _source(_cell(nb, "# @title Install unclip-jax"))
    # A Colab form parameter for the package source; pip only where unclip_jax does not import.
    assert 'SOURCE = "git+https://' in install and '# @param {type:"string"}' in install
    assert 'find_spec("unclip_jax") is None' in install
    assert '%pip install -q "unclip-jax{extra} @ {SOURCE}"' in install
    assert '"[cuda12]"' in install and '"[tpu]"' in install and "jax.default_backend()" in install
    karlo = _source(_cell(nb, "RUN_KARLO ="))
    assert 'RUN_KARLO = False  # @param {type:"boolean"}' in karlo
    assert 'KARLO = "kakaobrain/karlo-v1-alpha"' in karlo
    assert "UnCLIPPipeline.from_pretrained(" in karlo and "KARLO, dtype=" in karlo
    assert "socket.create_connection" in karlo


def test_saved_outputs():
    nb = _notebook()
    assert os.path.getsize(NOTEBOOK) < 2_000_000
    cells = _code_cells(nb)
    # One run, top to bottom, in one kernel, without errors.
    assert [c["execution_count"] for c in cells] == list(range(1, len(cells) + 1))
    assert not [o for c in cells for o in c["outputs"] if o["output_type"] == "error"]
    settings = {}
    exec(_source(_cell(nb, "# Settings")), settings)
    s = {k: settings[k] for k in ("PROMPTS", "NUM_IMAGES", "NUM_VARIATIONS", "NUM_FRAMES",
                                  "THETAS")}
    # Each picture is a grid of square images: its shape says how many images it tiles.
    expected = {"pipe.generate(": (s["NUM_IMAGES"], len(s["PROMPTS"])),
                "apps.variations(": (s["NUM_VARIATIONS"] + 1, 1),
                "apps.interpolate(": (s["NUM_FRAMES"], 1),
                "apps.textdiff(": (len(s["THETAS"]), 1)}
    for text, (cols, rows) in expected.items():
        pictures = _pictures(_cell(nb, text))
        assert len(pictures) == 1, text
        w, h = pictures[0].size
        assert w // cols == h // rows and w % cols == 0 and h % rows == 0, (text, w, h)
        assert any(lo < hi for lo, hi in pictures[0].convert("RGB").getextrema()), text  # not blank
    table = [o["data"]["text/markdown"] for o in _cell(nb, "caption_accuracy(")["outputs"]
             if "text/markdown" in o.get("data", {})]
    assert len(table) == 1 and "".join(table[0]).startswith("| metric | value |")
    assert "accuracy" in "".join(table[0])
    karlo = "".join(t for o in _cell(nb, "RUN_KARLO =")["outputs"] for t in o.get("text", ""))
    assert karlo.startswith("Skipped (RUN_KARLO = False)")


def test_notebook_runs_headless(tmp_path, monkeypatch):
    from unclip_jax.assets import SHAPES as BUNDLED_SHAPES
    cells = [_source(c) for c in _code_cells(_notebook())]
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
    # The Karlo cell is off by default: it touched no network and loaded nothing.
    assert ns["RUN_KARLO"] is False and not ns["online"] and "karlo" not in ns
