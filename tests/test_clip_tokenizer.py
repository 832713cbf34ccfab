"""The CLIP tokenizer: ids equal Hugging Face's CLIPTokenizer built from the same vocabulary."""
import json
import os

import numpy as np
import pytest
from transformers import CLIPTokenizer

from unclip_jax.clip.tokenizer import CaptionError, Tokenizer, get_tokenizer

CAPTIONS = [
    "a red circle at the top left",
    "a small blue square in the center",
    "a green triangle to the left of a yellow circle",
    "A photo of a CAT!!  sitting on 2 mats, isn't it? They'll say we've done it; I'm sure you'd agree.",
    "an astronaut riding a horse on the moon, digital art, 4k, trending on artstation",
    "héllo wörld \u2014 naïve café, Straße, ÉCOLE",
    "日本語のキャプション 🙂🚀 emoji and CJK",
    "tabs\tand\nnewlines\r\n   and   runs of   spaces ",
    "punctuation: (brackets) [square] {curly} <angle> \"quotes\" 'single' ... ?!",
    "numbers 1234567890 3.14159 1,000,000 and 2nd/3rd",
    "<|startoftext|> special tokens written in text <|endoftext|>",
    "UPPER lower MiXeD",
    "a",
    "corgi" * 30,
    " ".join(["word"] * 120),  # longer than the context: truncated by both
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


@pytest.fixture(scope="module")
def hf(tok, tmp_path_factory):
    """Hugging Face's tokenizer over vocab.json / merges.txt written from our shipped vocabulary."""
    d = tmp_path_factory.mktemp("hf_tok")
    with open(os.path.join(d, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(tok.encoder, f)
    merges = sorted(tok.merge_rank, key=tok.merge_rank.get)
    with open(os.path.join(d, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return CLIPTokenizer.from_pretrained(str(d))


def test_vocabulary_layout(tok):
    assert tok.vocab_size == 49408
    assert tok.sot_id == 49406 and tok.eot_id == 49407
    assert tok.encoder["!"] == 0 and tok.encoder["a</w>"] == 320


@pytest.mark.parametrize("caption", CAPTIONS)
def test_ids_and_mask_equal_hugging_face(tok, hf, caption):
    ref = hf(caption, padding="max_length", max_length=77, truncation=True)
    ours = tok(caption, truncate=True)
    assert ours.ids.shape == (1, 77) and ours.ids.dtype == np.int32
    np.testing.assert_array_equal(ours.ids[0], ref["input_ids"])
    np.testing.assert_array_equal(ours.mask[0], np.asarray(ref["attention_mask"], bool))


def test_batch_rows_and_eot_kept_on_truncation(tok):
    batch = tok(CAPTIONS, truncate=True)
    assert batch.ids.shape == (len(CAPTIONS), 77)
    for row, mask in zip(batch.ids, batch.mask):
        n = int(mask.sum())
        assert row[0] == tok.sot_id and row[n - 1] == tok.eot_id
        assert (row[n:] == tok.pad_id).all()
    assert batch.mask[-1].all()  # the overlong caption fills the context, EOT last


def test_round_trip(tok):
    assert tok.decode(tok("A Photo of a CAT, isn't it?").ids[0]) == "a photo of a cat , isn 't it ?"
    assert tok.decode(tok.encode("naïve café 🙂")) == "naïve café 🙂"


def test_html_entities_are_unescaped_as_in_clip_training(tok):
    # OpenAI's cleaning (ftfy + html.unescape) runs before BPE; Hugging Face's tokenizer skips it.
    assert tok.encode("salt &amp; pepper") == tok.encode("salt & pepper")


def test_context_length_and_pad_id(tok):
    short = Tokenizer(context_length=16, pad_id=0)("a red circle")
    assert short.ids.shape == (1, 16)
    assert short.ids[0, 5:].tolist() == [0] * 11 and short.mask[0, :5].all()


def test_overlong_caption_is_refused_with_a_clear_message(tok):
    with pytest.raises(CaptionError, match=r"Caption 1 is 120 tokens long.*truncate=True"):
        tok(["fine", " ".join(["word"] * 120)])


@pytest.mark.parametrize("caption", ["", "   ", "\n\t"])
def test_empty_caption_is_refused_unless_allowed(tok, caption):
    with pytest.raises(CaptionError, match=r"Caption 0 .* is empty.*allow_empty=True"):
        tok(caption)
    null = tok(caption, allow_empty=True)
    assert null.ids[0, :2].tolist() == [tok.sot_id, tok.eot_id] and null.mask[0].sum() == 2


def test_non_string_caption_is_refused(tok):
    with pytest.raises(CaptionError, match="Caption 0 is a int"):
        tok([3])


def test_shared_instance_is_cached():
    assert get_tokenizer() is get_tokenizer()
