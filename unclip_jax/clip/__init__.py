"""CLIP in Flax NNX: encoders, tokenizer, preprocessing, contrastive loss (Hugging Face CLIPModel
folders load through :mod:`unclip_jax.convert.hf_clip`).

  Tokenizer, get_tokenizer, CaptionError        tokenizer.py   (offline BPE, context 77)
  CLIP, CLIPConfig, get_preset, preset_names    model.py       (ViT + causal text Transformer)
  CLIPTextEncoder                               text_encoder.py (text tower + projection alone)
  preprocess, preprocess_jax                    preprocess.py  (as CLIPImageProcessor)
  contrastive_loss                              loss.py        (InfoNCE, learned temperature)
"""
from .loss import contrastive_loss
from .model import CLIP, CLIPConfig, get_preset, preset_names
from .preprocess import preprocess, preprocess_jax
from .text_encoder import CLIPTextEncoder
from .tokenizer import CaptionError, Tokenizer, Tokens, get_tokenizer

__all__ = [
    "CLIP", "CLIPConfig", "CLIPTextEncoder", "CaptionError", "Tokenizer", "Tokens",
    "contrastive_loss", "get_preset", "get_tokenizer", "preprocess", "preprocess_jax",
    "preset_names",
]
