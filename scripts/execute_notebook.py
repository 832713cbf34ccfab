"""Run colabs/unclip_shapes.ipynb top to bottom in a fresh kernel and save it with its outputs.

    python scripts/execute_notebook.py [--notebook colabs/unclip_shapes.ipynb] [--out PATH]

The kernel is this interpreter's (ipykernel, nbclient and nbformat: the `test` extra) started in
the repository root with the checkout first on PYTHONPATH, so it runs this tree's unclip_jax
against the bundled Shapes model (UNCLIP_SHAPES_CHECKPOINT is dropped) at the notebook's own
settings. The install cell sees unclip_jax and skips pip; the Karlo cell is skipped unless the
notebook sets RUN_KARLO. A cell that fails stops the run and nothing is written. Pictures are
embedded as PNG; no timing metadata is recorded, so a rerun changes only what changed.
"""
import argparse
import os
import sys
import time

import nbformat
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--notebook", default=os.path.join(REPO, "colabs", "unclip_shapes.ipynb"))
    parser.add_argument("--out", default=None, help="where to save it (default: in place)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    args = parser.parse_args(argv)

    os.environ.pop("UNCLIP_SHAPES_CHECKPOINT", None)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    nb = nbformat.read(args.notebook, as_version=4)
    client = NotebookClient(nb, timeout=args.timeout, kernel_name="python3",
                            record_timing=False, resources={"metadata": {"path": REPO}})
    start = time.time()
    client.execute()
    nbformat.validate(nb)
    out = args.out or args.notebook
    nbformat.write(nb, out)
    print(f"executed {args.notebook} in {time.time() - start:.0f} s; wrote {out} "
          f"({os.path.getsize(out) / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
