"""``unclip-jax export``: a trainer checkpoint -> a component of an unclip-jax pipeline folder.

    unclip-jax export --workdir runs/decoder --out PIPELINE_DIR --name decoder --ema \
        --dtype bfloat16 [--sampling shapes]
    unclip-jax export --workdir runs/clip --hf-out runs/clip_hf [--out DIR --name text_encoder]

See unclip_jax.train.to_pipeline.
"""
from __future__ import annotations

import argparse

HELP = "Export a trained stage (trainer workdir) into an unclip-jax pipeline folder."


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export", help=HELP,
        description=HELP + " The model is rebuilt from the config stored in the checkpoint. A "
        "CLIP run can also be written as a Hugging Face CLIPModel folder (--hf-out), which "
        "`unclip-jax precompute --clip` reads.")
    p.add_argument("--workdir", required=True, metavar="DIR",
                   help="The trainer workdir (its latest checkpoint is exported).")
    p.add_argument("--out", metavar="PIPELINE_DIR",
                   help="Pipeline folder to add the component to (created if missing; an "
                   "existing component is replaced only with --overwrite, other files kept).")
    p.add_argument("--name", help="Component name, e.g. text_encoder, clip, prior, ar_prior, "
                   "decoder, sr64 (default: from the stage).")
    p.add_argument("--ema", action="store_true", help="Export the EMA of the parameters.")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                   help="Storage dtype of float tensors (default: as trained).")
    p.add_argument("--hf-out", metavar="DIR", help="CLIP runs: also write a Hugging Face "
                   "CLIPModel folder here.")
    p.add_argument("--overwrite", action="store_true",
                   help="Replace the component NAME if --out already has it (and the files of "
                   "--hf-out); other components and files there are kept.")
    p.add_argument("--sampling", choices=("shapes",),
                   help="Write these sampling defaults into the folder's manifest.")
    p.set_defaults(func=run)
    return p


_DEFAULT_NAMES = {"clip": "text_encoder", "diffusion_prior": "prior", "ar_prior": "ar_prior",
                  "decoder": "decoder", "upsampler": "super_res"}


def run(args, overrides) -> int:
    from unclip_jax.errors import UserError
    if overrides:
        raise UserError("'export' takes no --config.* overrides: the model is rebuilt from the "
                        "config saved with the checkpoint.")
    if not args.out and not args.hf_out:
        raise UserError("Nothing to write: give --out PIPELINE_DIR (and --name) and/or --hf-out "
                        "DIR.")
    from unclip_jax.train import to_pipeline
    stage = to_pipeline.stage_of(to_pipeline.check_workdir(args.workdir))
    name = args.name or _DEFAULT_NAMES.get(stage, "component")
    # every output is checked before the model is loaded
    to_pipeline.check_export(args.workdir, args.out, name, stage=stage, hf_out=args.hf_out,
                             sampling=args.sampling, overwrite=args.overwrite)
    summary = to_pipeline.export_workdir(args.workdir, args.out, name, ema=args.ema,
                                         dtype=args.dtype, hf_out=args.hf_out,
                                         sampling=args.sampling, overwrite=args.overwrite)
    parts = [f"step {summary['step']} of {summary['stage']}" + (" (EMA)" if args.ema else "")]
    if "out" in summary:
        parts.append(f"-> {summary['out']}/{summary['name']}.safetensors ({summary['cls']}, "
                     f"{summary['bytes'] / 2**20:.2f} MiB)")
    if "hf_out" in summary:
        parts.append(f"-> Hugging Face folder {summary['hf_out']}")
    print("exported " + " ".join(parts))
    return 0
