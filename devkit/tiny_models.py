"""Tiny random decoder-only LLMs with REAL tokenizers, built once per machine for the tests.

`make_tiny_llm(family=...)` returns a Hugging Face folder (config.json, model.safetensors, tokenizer
files) that `adapter.load_llm` loads like a downloaded model. The weights are random (hidden 64,
2 blocks, 4 heads, 2 KV heads: grouped-query attention is exercised), the tokenizers are real:

- qwen2 / qwen3: the Qwen2.5 tokenizer ComfyUI ships (`comfy/text_encoders/qwen25_tokenizer`), with
  its own ChatML template (qwen2) or a Qwen3-style template with the `enable_thinking` switch (qwen3).
- llama: the Llama 3 tokenizer ComfyUI ships (`comfy/text_encoders/llama_tokenizer`), with the
  Llama 3 Instruct chat template (ComfyUI's copy always appends the assistant header; the real one
  does so only for `add_generation_prompt`).
- llama2, gemma2, gemma3: a ~1000-piece SentencePiece BPE model trained here on a built-in corpus
  (byte fallback on, so CJK and emoji encode), in the layout of the real family: Llama 2 (`<s>`,
  `</s>`, dummy prefix, no chat template: the plain-text path) and Gemma (`<bos>`, `<eos>`,
  `<start_of_turn>`, no dummy prefix) with the real Gemma 2 template (refuses a system turn) and the
  real Gemma 3 template (folds a system turn into the first user turn).

The embedding must cover the whole vocabulary (151k rows for Qwen), so the width stays small.
Folders are written atomically (temp dir, then rename) so parallel or aborted runs never leave a
half-built model in the cache.
"""
from __future__ import annotations

import functools
import io
import os
import random
import shutil
import tempfile
from pathlib import Path

from devkit.cache import build_folder_once, cache_dir, comfy_tokenizer_dir

FAMILIES = ("qwen2", "qwen3", "llama", "llama2", "gemma2", "gemma3")

# Bump when what a fixture folder contains changes, so stale caches are not reused.
FIXTURE_VERSION = 1

# Qwen3's template for plain string messages (the tool-calling branches are left out). With
# enable_thinking=False it writes an empty think block after the *generation prompt* only.
QWEN3_CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) or message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

# Meta-Llama-3-8B-Instruct's template.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# gemma-2-*-it's template: a system turn raises.
GEMMA2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

# gemma-3-*-it's template for string content: a system turn becomes a prefix of the first user turn.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}"
)

_WORDS = (
    "a an the of with on in under over near and or by at from to is are this that red green blue yellow "
    "orange purple black white grey pink brown cat dog bird horse fox owl fish house tree car boat sky "
    "river mountain city night day small large tiny huge happy old young painting photo portrait "
    "landscape wearing holding standing sitting running flying beautiful dark bright light shadow forest "
    "ocean beach street detailed style oil watercolor sketch cinematic golden hour sunset morning rain "
    "snow fog glowing neon castle garden flower window door table chair book lamp user model system "
    "describe image picture scene prompt quality masterpiece realistic background foreground"
).split()


def _training_corpus() -> list[str]:
    """Caption-like sentences plus digits, punctuation and code so common pieces are learnt."""
    rng = random.Random(1234)
    lines = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 14))) for _ in range(4000)]
    lines += ["0123456789 3.14 1,000 42% $5 #1 @home (x) [y] {z} <a> \"q\" 'r' !? ; : - _ + = * / \\ | ~ `"] * 20
    lines += ["def f(x):\n    return x + 1\n", "for i in range(10): print(i)"] * 20
    return lines


def _train_sentencepiece(flavour: str) -> bytes:
    """A small SentencePiece BPE model laid out like Llama 2's ('llama2') or Gemma's ('gemma')."""
    import sentencepiece as spm

    if flavour == "gemma":
        ids = dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
                   unk_piece="<unk>", user_defined_symbols=["<mask>", "<start_of_turn>", "<end_of_turn>"],
                   add_dummy_prefix=False)
    else:
        ids = dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1, unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
                   add_dummy_prefix=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_training_corpus()), model_writer=model, vocab_size=1000, model_type="bpe",
        byte_fallback=True, split_digits=True, hard_vocab_limit=False, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, num_threads=1, minloglevel=2, **ids,
    )
    return model.getvalue()


def _sentencepiece_tokenizer(family: str, work: Path):
    """Train the SentencePiece model, write tokenizer.model into `work`, and wrap it in transformers' class."""
    from transformers import GemmaTokenizer, LlamaTokenizer

    flavour = "llama2" if family == "llama2" else "gemma"
    (work / "tokenizer.model").write_bytes(_train_sentencepiece(flavour))
    if flavour == "gemma":
        # from_pretrained converts tokenizer.model into a fast tokenizer (transformers 5 has no slow class).
        tokenizer = GemmaTokenizer.from_pretrained(work)
        tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
        tokenizer.chat_template = GEMMA2_CHAT_TEMPLATE if family == "gemma2" else GEMMA3_CHAT_TEMPLATE
    else:
        tokenizer = LlamaTokenizer.from_pretrained(work)  # Llama 2 base: no chat template
    return tokenizer


def _tokenizer(family: str, work: Path):
    from transformers import AutoTokenizer

    if family in ("qwen2", "qwen3"):
        tokenizer = AutoTokenizer.from_pretrained(comfy_tokenizer_dir("qwen25_tokenizer"))
        if family == "qwen3":
            tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
        elif not tokenizer.chat_template:
            raise RuntimeError("ComfyUI's qwen25_tokenizer lost its chat template; set the Qwen2.5 ChatML one here")
        return tokenizer
    if family == "llama":
        tokenizer = AutoTokenizer.from_pretrained(comfy_tokenizer_dir("llama_tokenizer"))
        tokenizer.chat_template = LLAMA3_CHAT_TEMPLATE
        return tokenizer
    return _sentencepiece_tokenizer(family, work)


def _model(family: str, vocab_size: int, tokenizer, seed: int):
    """The random CausalLM (with its LM head, as a real checkpoint has one; tied to keep the file small)."""
    import torch
    from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig,
                              LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    gemma = dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8)  # small window: the local layers matter
    builders = {
        "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**common)),
        "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(head_dim=16, **common)),
        "llama": lambda: LlamaForCausalLM(LlamaConfig(rope_theta=500000.0, **common)),
        "llama2": lambda: LlamaForCausalLM(LlamaConfig(**common)),
        "gemma2": lambda: Gemma2ForCausalLM(Gemma2Config(**gemma, **common)),
        "gemma3": lambda: Gemma3ForCausalLM(Gemma3TextConfig(**gemma, **common)),
    }
    torch.manual_seed(seed)
    return builders[family]().eval()


def _build(family: str, dest: Path, seed: int) -> None:
    """Write the complete folder into `dest` (which must not exist yet)."""
    dest.mkdir(parents=True)
    tokenizer = _tokenizer(family, dest)
    tokenizer.save_pretrained(dest)
    model = _model(family, len(tokenizer), tokenizer, seed)
    model.save_pretrained(dest, safe_serialization=True)


def default_dir(family: str, seed: int = 0) -> Path:
    """Where make_tiny_llm caches a family's folder."""
    return cache_dir() / "tiny_llm" / f"v{FIXTURE_VERSION}" / f"{family}-seed{seed}"


def make_tiny_llm(dest_dir: str | os.PathLike | None = None, family: str = "qwen2", seed: int = 0) -> Path:
    """A tiny random LLM folder of `family` (see FAMILIES); built once, then reused from the cache.

    `dest_dir` = None uses default_dir(family, seed). An existing folder holding a config.json is
    returned as is (the atomic rename guarantees it is complete).
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny LLM family {family!r}; choose one of {FAMILIES}")
    dest = Path(dest_dir) if dest_dir is not None else default_dir(family, seed)
    return build_folder_once(dest, lambda work: _build(family, work, seed))


def make_tiny_multimodal_gemma3(dest_dir: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny Gemma3ForConditionalGeneration (SigLIP tower + text decoder) with the gemma3 tokenizer.

    For the multimodal path of load_llm (the text decoder is kept, the vision tower dropped).
    Built straight into `dest_dir` (a test's tmp_path; it takes about a second).
    """
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    dest = Path(dest_dir)
    text_only = make_tiny_llm(family="gemma3", seed=seed)
    text = Gemma3TextConfig.from_pretrained(text_only)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4))
    model.save_pretrained(dest, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "chat_template.jinja"):
        shutil.copy(text_only / name, dest / name)
    return dest


@functools.lru_cache(maxsize=None)
def tiny_tokenizer(family: str, seed: int = 0):
    """The family's tokenizer as load_llm loads it, shared within a test process (do not mutate it)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(make_tiny_llm(family=family, seed=seed))


def other_tokenizer_packaging(folder: str | os.PathLike, family: str):
    """The same tokenizer packaged differently from `AutoTokenizer.from_pretrained(folder)`.

    For the fingerprint test: Qwen from ComfyUI's original vocab.json + merges.txt; Llama 3 as a bare
    PreTrainedTokenizerFast over tokenizer.json with only its special tokens named (no pad, as
    Meta's own packaging); SentencePiece families converted afresh from tokenizer.model alone
    instead of the saved tokenizer.json.
    """
    from transformers import AutoTokenizer, GemmaTokenizer, LlamaTokenizer, PreTrainedTokenizerFast

    folder = Path(folder)
    if family in ("qwen2", "qwen3"):
        return AutoTokenizer.from_pretrained(comfy_tokenizer_dir("qwen25_tokenizer"))
    if family == "llama":
        return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), bos_token="<|begin_of_text|>",
                                       eos_token="<|end_of_text|>", unk_token="<unk>")
    sp_only = Path(tempfile.mkdtemp(prefix="sp-only-"))
    try:
        shutil.copy(folder / "tokenizer.model", sp_only / "tokenizer.model")
        if family == "llama2":
            return LlamaTokenizer.from_pretrained(sp_only)
        tokenizer = GemmaTokenizer.from_pretrained(sp_only)
        tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
        return tokenizer
    finally:
        shutil.rmtree(sp_only, ignore_errors=True)
