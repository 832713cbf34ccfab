"""CLIP in Flax NNX: encoders, tokenizer, preprocessing, contrastive loss, Hugging Face import.

  Tokenizer, get_tokenizer, CaptionError        tokenizer.py   (offline BPE, context 77)
  CLIP, CLIPConfig, get_preset, preset_names    model.py       (ViT + causal text Transformer)
  CLIPTextEncoder                               text_encoder.py (text tower + projection alone)
  from_pretrained, save_pretrained,             hf_import.py   (transformers CLIPModel folders,
  CheckpointError, CheckpointMismatchError                      safetensors only)
  preprocess, preprocess_jax                    preprocess.py  (as CLIPImageProcessor)
  contrastive_loss                              loss.py        (InfoNCE, learned temperature)
"""
from .hf_import import CheckpointError, CheckpointMismatchError, from_pretrained, save_pretrained
from .loss import contrastive_loss
from .model import CLIP, CLIPConfig, get_preset, preset_names
from .preprocess import preprocess, preprocess_jax
from .text_encoder import CLIPTextEncoder
from .tokenizer import CaptionError, Tokenizer, Tokens, get_tokenizer

__all__ = [
    "CLIP", "CLIPConfig", "CLIPTextEncoder", "CaptionError", "CheckpointError", "CheckpointMismatchError",
    "Tokenizer", "Tokens", "contrastive_loss", "from_pretrained", "get_preset", "get_tokenizer",
    "preprocess", "preprocess_jax", "preset_names", "save_pretrained",
]
