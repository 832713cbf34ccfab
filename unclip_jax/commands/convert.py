"""``unclip-jax convert --from diffusers SRC --out DST``: a diffusers UnCLIPPipeline folder
(Karlo) -> an unclip-jax pipeline folder (see :mod:`unclip_jax.convert.diffusers_pipeline`).

Safetensors only, unless ``--allow-pickle`` (then ``torch.load(weights_only=True)``). Every
tensor must map: missing or unexpected tensors are listed and nothing is written.
"""
from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="Convert a diffusers UnCLIPPipeline (Karlo) folder to our format.",
        description="Read a diffusers UnCLIPPipeline folder (prior, text_encoder, tokenizer, "
        "text_proj, decoder, super_res_first/last, schedulers) and write an unclip-jax pipeline "
        "folder (unclip.json + one safetensors per component).")
    p.add_argument("--from", dest="source_format", choices=("diffusers",), default="diffusers",
                   help="Format of the source folder.")
    p.add_argument("src", metavar="SRC", help="The source folder.")
    p.add_argument("--out", required=True, metavar="DST", help="The output folder: new, empty, "
                   "or an unclip-jax pipeline folder to replace (with --overwrite). Written "
                   "atomically; only unclip.json and its weights files are replaced, other "
                   "files there are kept.")
    p.add_argument("--overwrite", action="store_true",
                   help="Replace the pipeline already in --out (its manifest and the weights it "
                   "lists; nothing else).")
    p.add_argument("--allow-pickle", action="store_true",
                   help="Read pickled .bin weights with torch.load(weights_only=True) when a "
                   "component has no safetensors.")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="Storage dtype of the output tensors (loaded back as float32).")
    p.set_defaults(func=run)


def run(args, overrides) -> int:
    import time

    from unclip_jax.convert.diffusers_pipeline import (WRITES, check_source,
                                                       convert_diffusers_pipeline)
    from unclip_jax.io import pipeline_folder
    check_source(args.src)                                              # before any work
    pipeline_folder.check_output(args.out, overwrite=args.overwrite, will_write=WRITES)
    start = time.time()
    print(f"converting {args.src} -> {args.out}")
    report = convert_diffusers_pipeline(args.src, args.out, allow_pickle=args.allow_pickle,
                                        dtype=None if args.dtype == "float32" else args.dtype,
                                        log=print, overwrite=args.overwrite)
    total = sum(c["params"] for c in report["components"].values())
    print(f"every tensor mapped; {total:,} values in {len(report['components'])} components; "
          f"{time.time() - start:.1f}s")
    return 0
