"""``unclip-jax clip-retrieval``: how well a CLIP's image embedding names its Shapes caption.

    unclip-jax clip-retrieval --clip runs/clip                 # every kept checkpoint: the curve
    unclip-jax clip-retrieval --clip runs/clip --steps 500,1000
    unclip-jax clip-retrieval --clip shapes_model              # a pipeline folder's CLIP
    unclip-jax clip-retrieval                                  # the bundled Shapes model's CLIP

For the first ``--num-examples`` images of the Shapes TEST split, the caption retrieved from each
image embedding among all distinct test captions, right when it describes the same scene
(:mod:`unclip_jax.evaluate.clip_retrieval`). One row per checkpoint step (a training workdir) or
one row (a pipeline folder), as a markdown table; ``--out FILE.md`` writes it too.
"""
from __future__ import annotations

from unclip_jax.commands.apps import positive_int, seed_int
from unclip_jax.errors import UserError


class RetrievalCommandError(UserError, ValueError):
    """A clip-retrieval flag that cannot be used as given."""


def _steps(text: str) -> list[int]:
    import argparse
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--steps takes checkpoint steps separated by commas "
                                         f"(e.g. 500,1000), got {text!r}") from None
    if not steps or min(steps) < 0:
        raise argparse.ArgumentTypeError(f"--steps takes checkpoint steps >= 0, got {text!r}")
    return sorted(set(steps))


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "clip-retrieval", help="Shapes caption retrieval from a CLIP's image embeddings.",
        description="For Shapes TEST images, retrieve the caption among all distinct test "
        "captions whose CLIP text embedding is closest to the image embedding, and report "
        "one-object and two-object accuracy (a caption and its mirror image count as the same "
        "scene).")
    p.add_argument("--clip", metavar="DIR",
                   help="A CLIP training workdir (`unclip-jax train` stage clip: every kept "
                   "checkpoint, or --steps) or a pipeline folder (its CLIP). Default: the "
                   "bundled Shapes model.")
    p.add_argument("--steps", type=_steps, default=None,
                   help="Checkpoint steps of a training workdir, comma-separated (default: all "
                   "kept).")
    p.add_argument("--num-examples", type=positive_int("--num-examples", 1_000_000),
                   default=2000, help="Test examples (the first N of the test split).")
    p.add_argument("--data-seed", type=seed_int("--data-seed"), default=None,
                   help="Seed of the Shapes dataset (default: the dataset's default seed).")
    p.add_argument("--batch-size", type=positive_int("--batch-size"), default=100,
                   help="Images or captions per CLIP call.")
    p.add_argument("--out", metavar="FILE.md", help="Also write the table as markdown.")
    p.add_argument("--overwrite", action="store_true",
                   help="Replace the --out file if it exists (without it, it is refused).")
    p.set_defaults(func=run)


def _is_workdir(path: str) -> bool:
    from unclip_jax.io import paths
    from unclip_jax.train import checkpoint as ckpt
    return paths.isdir(ckpt.checkpoint_dir(path))


def _models(args):
    """(label, clip model, context length) for each row, loaded one at a time."""
    if args.clip is not None and _is_workdir(args.clip):
        from unclip_jax.train import checkpoint as ckpt
        from unclip_jax.train.to_pipeline import check_workdir, load_trained, stage_of
        check_workdir(args.clip)
        stage = stage_of(args.clip)
        if stage != "clip":
            raise RetrievalCommandError(f"{args.clip} is a workdir of stage {stage!r}, not a "
                                        "CLIP run; pass a CLIP workdir or a pipeline folder.")
        manager = ckpt.make_manager(args.clip)
        try:
            kept = sorted(manager.all_steps())
        finally:
            manager.close()
        if not kept:
            raise RetrievalCommandError(f"{args.clip} keeps no checkpoint yet; train first (or "
                                        "wait for the first checkpoint.every_steps).")
        steps = args.steps if args.steps is not None else kept
        missing = [s for s in steps if s not in kept]
        if missing:
            raise RetrievalCommandError(f"{args.clip} keeps no checkpoint at step(s) {missing}; "
                                        f"it keeps {kept}.")
        for step in steps:
            model, config, step = load_trained(args.clip, step=step)
            yield f"step {step}", model, int(config.model.context_length)
        return
    if args.steps is not None:
        raise RetrievalCommandError("--steps needs --clip to be a CLIP training workdir.")
    from unclip_jax.commands.apps import checkpoint, load_pipeline, shown
    path = checkpoint(args, "--clip")
    pipe = load_pipeline(path)
    yield shown(path), pipe.clip, pipe.tokenizer.context_length


def run(args, overrides) -> int:
    if overrides:
        raise RetrievalCommandError("'clip-retrieval' takes no --config.* overrides; use its "
                                    "flags (see unclip-jax clip-retrieval --help).")
    from unclip_jax.io.outputs import check_file
    if args.out is not None:
        check_file(args.out, overwrite=args.overwrite, flag="--out")
    from unclip_jax.clip.tokenizer import get_tokenizer
    from unclip_jax.evaluate import clip_retrieval as cr
    from unclip_jax.evaluate import shapes_eval as se
    seed = se.DEFAULT_DATA_SEED if args.data_seed is None else args.data_seed
    images = captions = None
    rows, tokenizers = [], {}
    header = ("| model | one-object | two-object | two: same objects | two: swapped | candidates |\n"
              "|---|---|---|---|---|---|")
    print(header)
    for label, model, context in _models(args):
        if images is None:   # rendered once the first model loaded (a bad --clip fails first)
            images, captions = se.test_set(args.num_examples, seed)
        if context not in tokenizers:   # loading the vocabulary takes about a second
            tokenizers[context] = get_tokenizer(context)
        s = cr.shapes_retrieval(model, tokenizers[context], images=images, captions=captions,
                                batch_size=args.batch_size)
        row = (f"| {label} | {s['one']:.3f} | {s['two']:.3f} | {s['two/same_objects']:.3f} | "
               f"{s['two/swapped']:.3f} | {int(s['candidates'])} |")
        print(row, flush=True)
        rows.append(row)
    text = (f"# Shapes caption retrieval from CLIP image embeddings\n\n{args.num_examples} test "
            f"examples (data seed {seed}): {int(s['one/count'])} one-object, "
            f"{int(s['two/count'])} two-object\n\n{header}\n" + "\n".join(rows) + "\n")
    if args.out:
        from unclip_jax.commands.apps import shown
        from unclip_jax.io.outputs import write_text
        write_text(args.out, text)
        print(f"wrote {shown(args.out)}")
    return 0
