"""Tiny random T5 and T5Gemma encoder folders with real tokenizers, for the public-adapter tests.

- t5: a T5 encoder-decoder checkpoint (as Flan-T5 is published) with ComfyUI's T5 tokenizer
  (comfy/text_encoders/t5_tokenizer, the real 32k SentencePiece vocabulary);
- t5gemma: a T5Gemma encoder-decoder with the Gemma-style SentencePiece tokenizer of the tiny
  gemma3 LLM (devkit/tiny_models.py).
Built once into the shared cache (devkit.cache.build_folder_once). `width` sets the encoder's
hidden size, so a test can make one that fits an adapter (ELLA reads 2048-wide states at full size).
"""
from __future__ import annotations

import shutil
from pathlib import Path

from .cache import build_folder_once, cache_dir, comfy_tokenizer_dir

FIXTURE_VERSION = 1


def make_tiny_t5(width: int = 64, seed: int = 0) -> Path:
    def build(work: Path) -> None:
        import torch
        from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

        tokenizer = AutoTokenizer.from_pretrained(comfy_tokenizer_dir("t5_tokenizer"))
        torch.manual_seed(seed)
        config = T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=16, d_ff=2 * width, num_layers=2, num_decoder_layers=1,
                          num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                          pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0)
        T5ForConditionalGeneration(config).eval().save_pretrained(work, safe_serialization=True)
        tokenizer.save_pretrained(work)

    return build_folder_once(cache_dir() / "tiny_encoders" / f"v{FIXTURE_VERSION}" / f"t5-w{width}-seed{seed}", build)


def make_tiny_t5gemma(width: int = 64, seed: int = 0) -> Path:
    def build(work: Path) -> None:
        import torch
        from transformers import AutoTokenizer, T5GemmaConfig, T5GemmaForConditionalGeneration
        from transformers.models.t5gemma.configuration_t5gemma import T5GemmaModuleConfig

        from .tiny_models import make_tiny_llm

        gemma = make_tiny_llm(family="gemma3")
        tokenizer = AutoTokenizer.from_pretrained(gemma)
        module = dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
        torch.manual_seed(seed)
        config = T5GemmaConfig(encoder=T5GemmaModuleConfig(**module), decoder=T5GemmaModuleConfig(**module),
                               vocab_size=len(tokenizer))
        T5GemmaForConditionalGeneration(config).eval().save_pretrained(work, safe_serialization=True)
        for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json"):
            if (gemma / name).is_file():
                shutil.copy(gemma / name, work / name)

    return build_folder_once(cache_dir() / "tiny_encoders" / f"v{FIXTURE_VERSION}" / f"t5gemma-w{width}-seed{seed}", build)


def make_gemma3_1b_width(layers: int = 2, seed: int = 0, vocab_size: int | None = None) -> Path:
    """A random Gemma 3 decoder with Gemma-3-1B's widths (hidden 1152, 4 heads of 256, 1 KV head, MLP 6912)
    but `layers` blocks and the tiny gemma3 tokenizer: what a full-size RouWei-Gemma adapter reads, at a
    fraction of the 1B model's CPU time and memory (the vocabulary alone is 262k x 1152 there).
    `layers=26, vocab_size=262144` gives Gemma-3-1B's full shape (saved in bf16, 2 GB) for the benchmarks;
    ids from the tiny tokenizer are all below its 1000 pieces, so any vocabulary size works with it."""
    def build(work: Path) -> None:
        import torch
        from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

        from .tiny_models import make_tiny_llm

        gemma = make_tiny_llm(family="gemma3")
        tokenizer = AutoTokenizer.from_pretrained(gemma)
        torch.manual_seed(seed)
        config = Gemma3TextConfig(vocab_size=vocab_size or len(tokenizer), hidden_size=1152, intermediate_size=6912, num_hidden_layers=layers,
                                  num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                                  sliding_window=512, max_position_embeddings=32768, tie_word_embeddings=True,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
        model = Gemma3ForCausalLM(config).eval()
        if vocab_size:  # the full-size shape: bf16 on disk, as Gemma is published
            model = model.to(torch.bfloat16)
        model.save_pretrained(work, safe_serialization=True)
        tokenizer.save_pretrained(work)

    name = f"gemma3-w1152-l{layers}-seed{seed}" + (f"-v{vocab_size}" if vocab_size else "")
    return build_folder_once(cache_dir() / "tiny_encoders" / f"v{FIXTURE_VERSION}" / name, build)
