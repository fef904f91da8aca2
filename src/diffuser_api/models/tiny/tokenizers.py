"""Character-level tokenizers written to disk, because real vocabularies need a download."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import CLIPTokenizer, Qwen2Tokenizer, T5Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

CLIP_VOCAB_SIZE = 514


def build_clip_tokenizer(folder: Path) -> CLIPTokenizer:
    """One token per byte, plus start/end tokens: 514 ids, 77 positions like real CLIP."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + 256 for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = 512
    vocab["<|endoftext|>"] = 513
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    return CLIPTokenizer.from_pretrained(folder)


T5_VOCAB_SIZE = 192


def build_t5_tokenizer() -> T5Tokenizer:
    """Unigram T5 tokenizer, one token per printable ASCII char (with and without the ``▁``
    word prefix): 192 ids, ``<pad>``=0 and ``</s>``=1 like real T5, 512 positions."""
    chars = [chr(c) for c in range(32, 127) if chr(c) != " "]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(c, -3.0) for c in chars] + [("▁" + c, -3.5) for c in chars]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)
    assert len(tokenizer) == T5_VOCAB_SIZE, len(tokenizer)
    return tokenizer


QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
QWEN_VOCAB_SIZE = 256 + len(QWEN_SPECIAL_TOKENS)  # 264
QWEN_ENDOFTEXT_TOKEN_ID = 256
QWEN_IM_END_TOKEN_ID = 256 + QWEN_SPECIAL_TOKENS.index("<|im_end|>")  # 258
QWEN_IMAGE_TOKEN_ID = 256 + QWEN_SPECIAL_TOKENS.index("<|image_pad|>")  # 262
QWEN_VIDEO_TOKEN_ID = 256 + QWEN_SPECIAL_TOKENS.index("<|video_pad|>")  # 263
QWEN_VISION_START_TOKEN_ID = 256 + QWEN_SPECIAL_TOKENS.index("<|vision_start|>")  # 259
QWEN_VISION_END_TOKEN_ID = 256 + QWEN_SPECIAL_TOKENS.index("<|vision_end|>")  # 260


def build_qwen2_tokenizer() -> Qwen2Tokenizer:
    """Byte-level Qwen2 tokenizer with no merges (one token per byte) plus the chat and vision
    special tokens Qwen-Image prompts use: 264 ids, specials at 256-263."""
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    vocab.update({t: 256 + i for i, t in enumerate(QWEN_SPECIAL_TOKENS)})
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=[], model_max_length=1024, additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
    )
    assert len(tokenizer) == QWEN_VOCAB_SIZE, len(tokenizer)
    return tokenizer
