"""Build a diffusers UnCLIPPipeline at Karlo's FULL architecture with random weights, save it as
real files (float16 safetensors), convert it with `convert_diffusers_pipeline`, and report that
every tensor mapped plus the parameter count of each component.

    .venv/bin/python scripts/karlo_full_conversion.py --work /tmp/karlo_full
    .venv/bin/python scripts/karlo_full_conversion.py --preset mini --work /tmp/karlo_mini

Expected (preset karlo): ~3.4B parameters (prior ~1.0B, decoder + text_proj ~0.89B, each super-res
UNet ~0.69B, CLIP ViT-L/14 text tower ~0.12B); ~6.8 GB of float16 files per folder (source and
converted); peak memory about one component in float32 plus its float16 copy (~8-10 GB, the
prior), because components are built, saved and converted one at a time. 'mini' keeps Karlo's
block layout and depth with every width divided by 8: a minute on a laptop CPU.

Configs: kakaobrain/karlo-v1-alpha as diffusers' conversion script
(scripts/convert_kakao_brain_unclip_to_diffusers.py) defines them: PriorTransformer defaults (20
layers, 32 heads x 64, 768-dim embeddings, 77 tokens); decoder UNet2DConditionModel 320/640/960/
1280 channels, 3 res blocks, simple cross-attention at the three lower levels (heads of 64),
context 1536, class_embed_type 'identity', scale-shift norm, 6 output channels; text_proj with
4 extra tokens; super_res_first / super_res_last UNet2DModel 320/640/960/1280, 3 res blocks, no
attention, 6 -> 3 channels, additive time conditioning, 256 px; the text encoder is OpenAI CLIP
ViT-L/14's text tower with projection (768 wide, 12 layers, 12 heads, eos_token_id 2).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def configs(preset: str) -> dict:
    k = 1 if preset == "karlo" else 8
    ch = [c // k for c in (320, 640, 960, 1280)]
    groups = 32 if k == 1 else 8
    d = 768 // k
    return {
        "prior": dict(num_attention_heads=32 // k, attention_head_dim=64, num_layers=20,
                      embedding_dim=d, num_embeddings=77, additional_embeddings=4,
                      added_emb_type="prd", encoder_hid_proj_type="linear"),
        "text_encoder": dict(vocab_size=49408, hidden_size=d, intermediate_size=4 * d,
                             num_hidden_layers=12, num_attention_heads=12 // (1 if k == 1 else 4),
                             max_position_embeddings=77, projection_dim=d, hidden_act="quick_gelu",
                             eos_token_id=2, bos_token_id=0, pad_token_id=1),
        "text_proj": dict(clip_extra_context_tokens=4, clip_embeddings_dim=d,
                          time_embed_dim=4 * ch[0], cross_attention_dim=1536 // k),
        "decoder": dict(sample_size=64, layers_per_block=3, in_channels=3, out_channels=6,
                        block_out_channels=tuple(ch), cross_attention_dim=1536 // k,
                        attention_head_dim=64 // k, norm_num_groups=groups,
                        down_block_types=("ResnetDownsampleBlock2D",)
                        + ("SimpleCrossAttnDownBlock2D",) * 3,
                        up_block_types=("SimpleCrossAttnUpBlock2D",) * 3
                        + ("ResnetUpsampleBlock2D",),
                        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
                        class_embed_type="identity", resnet_time_scale_shift="scale_shift"),
        "super_res": dict(sample_size=256, layers_per_block=3, in_channels=6, out_channels=3,
                          block_out_channels=tuple(ch), norm_num_groups=groups,
                          down_block_types=("ResnetDownsampleBlock2D",) * 4,
                          up_block_types=("ResnetUpsampleBlock2D",) * 4, add_attention=False),
    }


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def build_source(folder: str, preset: str) -> dict:
    """Write the diffusers folder component by component (float16), freeing each."""
    import torch
    from diffusers import PriorTransformer, UNet2DConditionModel, UNet2DModel, UnCLIPScheduler
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    from unclip_jax.clip.tokenizer import Tokenizer
    cfg = configs(preset)
    counts = {}

    def save(name, make):
        start = time.time()
        torch.manual_seed(len(name))
        model = make().eval().half()
        counts[name] = sum(p.numel() for p in model.parameters())
        model.save_pretrained(os.path.join(folder, name), safe_serialization=True)
        del model
        gc.collect()
        print(f"  built {name}: {counts[name]:,} parameters, {time.time() - start:.0f}s, "
              f"peak RSS {peak_gb():.1f} GB", flush=True)

    save("prior", lambda: PriorTransformer(**cfg["prior"]))
    save("text_encoder", lambda: CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder"])))
    save("text_proj", lambda: UnCLIPTextProjModel(**cfg["text_proj"]))
    save("decoder", lambda: UNet2DConditionModel(**cfg["decoder"]))
    for name in ("super_res_first", "super_res_last"):
        save(name, lambda: UNet2DModel(**cfg["super_res"]))

    tok_dir = os.path.join(folder, "tokenizer")
    os.makedirs(tok_dir, exist_ok=True)
    ours = Tokenizer()
    with open(os.path.join(tok_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(ours.encoder, f)
    merges = sorted(ours.merge_rank, key=ours.merge_rank.get)
    with open(os.path.join(tok_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    CLIPTokenizer(os.path.join(tok_dir, "vocab.json"), os.path.join(tok_dir, "merges.txt"),
                  model_max_length=77).save_pretrained(tok_dir)
    UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample",
                    clip_sample_range=5.0).save_pretrained(os.path.join(folder, "prior_scheduler"))
    UnCLIPScheduler(variance_type="learned_range", prediction_type="epsilon").save_pretrained(
        os.path.join(folder, "decoder_scheduler"))
    UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="epsilon").save_pretrained(
        os.path.join(folder, "super_res_scheduler"))
    with open(os.path.join(folder, "model_index.json"), "w", encoding="utf-8") as f:
        json.dump({"_class_name": "UnCLIPPipeline"}, f)
    return counts


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/karlo_full", help="Folder for source/ and converted/.")
    p.add_argument("--preset", choices=("karlo", "mini"), default="karlo")
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"),
                   help="Storage dtype of the converted folder.")
    args = p.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    src, dst = os.path.join(args.work, "source"), os.path.join(args.work, "converted")
    t0 = time.time()
    print(f"building the diffusers folder ({args.preset}) in {src}")
    torch_counts = build_source(src, args.preset)
    t1 = time.time()
    from unclip_jax.convert.diffusers_pipeline import convert_diffusers_pipeline
    print(f"converting -> {dst}")
    report = convert_diffusers_pipeline(src, dst, dtype=None if args.dtype == "float32" else args.dtype,
                                        log=print)
    t2 = time.time()
    # Our counts include the prior's clip_mean / clip_std (torch parameters too); the decoder
    # is diffusers' decoder + text_proj.
    want = dict(torch_counts)
    want["decoder"] = want.pop("decoder") + want.pop("text_proj")
    print("component           ours            diffusers")
    for name, c in report["components"].items():
        print(f"  {name:18s}{c['params']:>14,}  {want.get(name, 0):>14,}"
              f"  {'ok' if c['params'] == want.get(name) else 'DIFFERS'}")
    total = sum(c["params"] for c in report["components"].values())
    print(f"every tensor mapped (no missing or unexpected); total {total:,} parameters")
    print(f"build {t1 - t0:.0f}s, convert {t2 - t1:.0f}s, peak RSS {peak_gb():.1f} GB")
    return 0 if all(c["params"] == want.get(n) for n, c in report["components"].items()) else 1


if __name__ == "__main__":
    sys.exit(main())
