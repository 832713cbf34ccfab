"""``unclip-jax eval``: caption accuracy of a pipeline on the Shapes test split.

    unclip-jax eval --checkpoint DIR --num-captions 500 --num-images 2 --seed 0 \
        --table --out out/eval.md

Prints the accuracy summary (one-object and two-object accuracy, each part, attribute binding,
diversity, images/s), with ``--table`` the paper's comparisons (diffusion prior vs AR prior vs
none; decoder guidance sweep; decoder sampler x steps), with ``--clip-metrics`` the CLIP score and
FD-CLIP (the pipeline's own CLIP against the test split's true images), and with
``--inception FILE`` the FID; ``--upsamplers`` judges the upsampling stages alone (true test
images at the decoder's size, upsampled). ``--out FILE.md`` writes the same as markdown. Without
``--checkpoint`` the bundled Shapes model (the same folder ``unclip-jax generate`` uses). The work
is done by :mod:`unclip_jax.evaluate.shapes_eval`.
"""
from __future__ import annotations

import argparse
import os

from unclip_jax.commands.apps import (GUIDANCE, SEED_HELP, count_int, finite_float, positive_int,
                                      seed_int)
from unclip_jax.errors import UserError


class EvalCommandError(UserError, ValueError):
    """An eval flag that cannot be used as given."""


def _list(name, kind, check=None):
    def parse(text):
        try:
            values = tuple(kind(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{name} must be a comma-separated list of {kind.__name__} values, got "
                f"{text!r}") from None
        if check is not None:
            values = tuple(check(str(v).strip()) for v in values)
        if not values:
            raise argparse.ArgumentTypeError(f"{name} needs at least one value")
        return values
    return parse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="Caption accuracy of a pipeline on the Shapes test split.",
        description="Generate images for captions of the Shapes TEST split, judge each exactly "
        "against its caption and print one-object and two-object accuracy, each part, "
        "attribute binding, layout diversity and speed; --table adds the paper's comparisons.")
    p.add_argument("--checkpoint", metavar="DIR",
                   help="An unclip-jax pipeline folder. Default: the bundled Shapes model.")
    p.add_argument("--num-captions", type=positive_int("--num-captions", 1_000_000), default=500,
                   help="Test captions to evaluate (the first N of the test split).")
    p.add_argument("--num-images", type=positive_int("--num-images", 1000), default=2,
                   help="Images per caption (diversity needs 2 or more).")
    p.add_argument("--seed", type=seed_int(), default=0,
                   help="Sampling seed: same seed, same numbers." + SEED_HELP)
    p.add_argument("--data-seed", type=seed_int("--data-seed"), default=None,
                   help="Seed of the Shapes dataset whose test split gives the captions "
                   "(default: the dataset's own default seed)." + SEED_HELP)
    p.add_argument("--batch-size", type=positive_int("--batch-size"), default=32,
                   help="Images per pipeline call.")
    p.add_argument("--prior", choices=("diffusion", "ar", "none"), default="diffusion",
                   help="Prior for the summary ('none': the decoder conditioned on z_t).")
    p.add_argument("--prior-steps", type=positive_int("--prior-steps"),
                   help="Prior sampling steps (None: the manifest's).")
    p.add_argument("--prior-guidance", type=finite_float("--prior-guidance", *GUIDANCE),
                   help="Prior guidance scale.")
    p.add_argument("--decoder-steps", type=positive_int("--decoder-steps"),
                   help="Decoder sampling steps.")
    p.add_argument("--decoder-guidance", type=finite_float("--decoder-guidance", *GUIDANCE),
                   help="Decoder guidance scale.")
    p.add_argument("--decoder-sampler", choices=("unclip", "ddpm", "ddim", "dpm++"),
                   help="Decoder sampler.")
    p.add_argument("--upsample", type=count_int("--upsample"),
                   help="Upsampling stages to run (None: all the pipeline has).")
    p.add_argument("--table", action="store_true",
                   help="Also run the comparison table (prior kinds, decoder guidance sweep, "
                   "decoder sampler x steps).")
    p.add_argument("--table-upsample", type=count_int("--table-upsample"), default=0,
                   help="Upsampling stages in the table's rows (0: the rows, which differ only "
                   "in the prior and the decoder, are judged on the decoder's own output; "
                   "much faster on a CPU).")
    p.add_argument("--table-captions", type=positive_int("--table-captions"), default=100,
                   help="Captions per row of the table (the first N of those evaluated).")
    p.add_argument("--table-priors", type=_list("--table-priors", str), default=None,
                   help="Priors of the table (default: each of diffusion, ar and none that the "
                   "pipeline has).")
    p.add_argument("--table-guidance", type=_list("--table-guidance", float, finite_float(
                   "--table-guidance", *GUIDANCE)), default=None,
                   help="Decoder guidance scales of the table (default: the paper's sweep, "
                   "unclip_jax.evaluate.shapes_eval.GUIDANCE_SCALES).")
    p.add_argument("--table-samplers", type=_list("--table-samplers", str), default=None,
                   help="Decoder samplers of the table (default: ddpm, ddim and dpm++).")
    p.add_argument("--table-steps", type=_list("--table-steps", int, positive_int(
                   "--table-steps")), default=None,
                   help="Decoder step counts of the table (default: "
                   "unclip_jax.evaluate.shapes_eval.SAMPLER_STEPS).")
    p.add_argument("--table-best-of", type=_list("--table-best-of", int, positive_int(
                   "--table-best-of", 1000)), default=None,
                   help="The prior's best-of counts of the table (default: 1,2).")
    p.add_argument("--clip-metrics", action="store_true",
                   help="Also CLIP score and FD-CLIP (the pipeline's CLIP; needs its image "
                   "tower) against the test split's true images.")
    p.add_argument("--inception", metavar="FILE",
                   help="pytorch-fid Inception weights (.pth or .safetensors): also report FID "
                   "against the test split's true images.")
    p.add_argument("--upsamplers", action="store_true",
                   help="Judge only the upsampling stages: the test split's true images at the "
                   "decoder's size, upsampled by each stage (up to --upsample), judged after "
                   "each; no prior or decoder runs.")
    p.add_argument("--out", metavar="FILE.md", help="Also write the report as markdown.")
    p.add_argument("--overwrite", action="store_true",
                   help="Replace the --out file if it exists (without it, it is refused).")
    p.set_defaults(func=run)


def _progress(total: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, leave=False)


def run(args, overrides) -> int:
    if overrides:
        raise EvalCommandError("'eval' takes no --config.* overrides; use its flags "
                               "(see unclip-jax eval --help).")
    if args.inception and not os.path.isfile(args.inception):
        raise EvalCommandError(f"--inception {args.inception} is not a file; pass pytorch-fid's "
                               "Inception weights (.pth or .safetensors).")
    if (args.clip_metrics or args.inception) and args.num_captions < 2:
        raise EvalCommandError("FD-CLIP and FID compare at least 2 generated with 2 true test "
                               f"images; raise --num-captions (got {args.num_captions}).")
    if args.upsamplers and (args.table or args.clip_metrics or args.inception):
        raise EvalCommandError("--upsamplers judges the upsampling stages alone; run --table, "
                               "--clip-metrics and --inception in a separate eval.")
    bad = [s for s in args.table_samplers or () if s not in ("unclip", "ddpm", "ddim", "dpm++")]
    if bad:
        raise EvalCommandError(f"--table-samplers: unknown sampler(s) {bad}; choose from "
                               "unclip, ddpm, ddim, dpm++.")
    bad = [p for p in args.table_priors or () if p not in ("diffusion", "ar", "none")]
    if bad:
        raise EvalCommandError(f"--table-priors: unknown prior(s) {bad}; choose from "
                               "diffusion, ar, none.")
    from unclip_jax.io.outputs import check_file
    from unclip_jax.commands.apps import checkpoint
    path = checkpoint(args)
    _check_against_folder(args, path)
    if args.out is not None:
        check_file(args.out, overwrite=args.overwrite, flag="--out")

    from unclip_jax.commands.apps import load_pipeline
    from unclip_jax.evaluate import shapes_eval as se
    defaults = dict(data_seed=se.DEFAULT_DATA_SEED, table_priors=se.PRIORS,
                    table_guidance=se.GUIDANCE_SCALES, table_samplers=se.TABLE_SAMPLERS,
                    table_steps=se.SAMPLER_STEPS, table_best_of=se.BEST_OF)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    inception = None
    if args.inception:   # a bad weights file is refused before the pipeline loads
        from unclip_jax.evaluate.inception import load_inception
        inception = load_inception(args.inception)
    pipe = load_pipeline(path)
    if args.upsamplers:
        with _progress(args.num_captions * 2, "upsamplers") as bar:
            rows = se.upsampler_accuracy(pipe, args.num_captions, seed=args.seed,
                                         data_seed=args.data_seed, batch_size=args.batch_size,
                                         upsample=args.upsample, progress=bar.update)
        from unclip_jax.commands.apps import shown
        report = ["# Shapes upsamplers on true images", "",
                  f"{shown(path)}: {args.num_captions} Shapes test images (data seed "
                  f"{args.data_seed}), seed {args.seed}", "", se.upsampler_markdown(rows)]
        return _finish(args, report)
    captions = se.test_captions(args.num_captions, args.data_seed)
    pick = lambda **kw: {k: v for k, v in kw.items() if v is not None}  # noqa: E731
    kwargs = dict(prior=args.prior,
                  prior_settings=pick(steps=args.prior_steps, guidance_scale=args.prior_guidance)
                  if args.prior == "diffusion" else pick(guidance_scale=args.prior_guidance),
                  decoder_settings=pick(steps=args.decoder_steps,
                                        guidance_scale=args.decoder_guidance,
                                        sampler=args.decoder_sampler),
                  upsample=args.upsample)
    reference = None
    if args.clip_metrics or args.inception:
        reference, _ = se.test_set(args.num_captions, args.data_seed)

    total = args.num_captions * args.num_images
    with _progress(total, "eval") as bar:
        summary = se.caption_accuracy(pipe, captions, seed=args.seed, num_images=args.num_images,
                                      batch_size=args.batch_size, reference_images=reference,
                                      clip_metrics=args.clip_metrics, inception=inception,
                                      progress=bar.update, **kwargs)
    from unclip_jax.commands.apps import shown
    what = (f"{shown(path)}: {args.num_captions} Shapes test captions (data seed {args.data_seed}) x "
            f"{args.num_images} images, seed {args.seed}, prior {args.prior}")
    report = ["# Shapes caption accuracy", "", what, "", se.summary_markdown(summary)]

    if args.table:
        table_caps = captions[:args.table_captions]
        base = {k: v for k, v in kwargs.items() if k in ("prior", "prior_settings")}
        base["upsample"] = args.table_upsample
        settings = se.comparison_settings(
            pipe, priors=args.table_priors, guidance_scales=args.table_guidance,
            samplers=args.table_samplers, steps=args.table_steps, best_of=args.table_best_of,
            base=dict(base, decoder_settings=kwargs["decoder_settings"]))
        with _progress(len(settings) * len(table_caps) * args.num_images, "table") as bar:
            table = se.comparison_table(pipe, table_caps, seed=args.seed,
                                        num_images=args.num_images, batch_size=args.batch_size,
                                        settings=settings, progress=bar.update)
        judged = ("the decoder's output" if args.table_upsample == 0 else
                  f"after {args.table_upsample} upsampling stage(s)")
        report += ["", f"## Comparisons ({len(table_caps)} captions x {args.num_images} images "
                   f"per row, judged on {judged})", "", table.markdown()]

    return _finish(args, report)


def _finish(args, report: list[str]) -> int:
    """Print the report and write it to --out."""
    text = "\n".join(report) + "\n"
    print(text, end="")
    if args.out:
        from unclip_jax.commands.apps import shown
        from unclip_jax.io.outputs import write_text
        write_text(args.out, text)
        print(f"wrote {shown(args.out)}")
    return 0


def _check_against_folder(args, path: str) -> None:
    """The flags that depend on the pipeline folder (its stages and sampling ranges), checked
    from its manifest before the model loads."""
    from unclip_jax.pipeline.pipeline import PipelineInfo
    from unclip_jax.pipeline.settings import check_stage
    info = PipelineInfo.from_folder(path)
    if info is None:
        return
    n_up = len(info.upsample_stages)
    if args.upsamplers and n_up == 0:
        raise EvalCommandError("--upsamplers: this pipeline has no upsampling stage with its "
                               "models; pass a pipeline that has one (e.g. the bundled model).")
    for flag, value in (("--upsample", args.upsample), ("--table-upsample", args.table_upsample)):
        if value is not None and value > n_up:
            raise EvalCommandError(f"{flag} {value}, but this pipeline has {n_up} upsampling "
                                   f"stage(s) with their models; give 0 to {n_up}.")
    from unclip_jax.commands.apps import _check_memory
    _check_memory(info, args.num_captions * args.num_images, args.upsample)
    if args.prior == "diffusion" and not info.has_prior:
        raise EvalCommandError("This pipeline has no diffusion prior; pass --prior ar or none.")
    if args.prior == "ar" and not info.has_ar_prior:
        raise EvalCommandError("This pipeline has no AR prior; pass --prior diffusion or none.")
    pick = lambda **kw: {k: v for k, v in kw.items() if v is not None}  # noqa: E731
    if args.prior == "diffusion":
        check_stage("prior", {**info.settings["prior"], **pick(steps=args.prior_steps,
                                                             guidance_scale=args.prior_guidance)})
    check_stage("decoder", {**info.settings["decoder"], **pick(
        steps=args.decoder_steps, guidance_scale=args.decoder_guidance,
        sampler=args.decoder_sampler)})
    for steps in args.table_steps or ():
        for sampler in args.table_samplers or ("ddpm", "ddim", "dpm++"):
            check_stage("decoder", {**info.settings["decoder"], "steps": steps,
                                    "sampler": sampler})
