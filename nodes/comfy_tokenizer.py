"""The transformers tokenizer for an LLM that ComfyUI loaded, from the tokenizer files ComfyUI uses for it.

The adapter's template code needs a transformers fast tokenizer (offsets to find the prompt, the
chat-template machinery), and the fingerprint must come out equal to the Hugging Face folder's for
the same model so that one adapter serves both. ComfyUI's tokenizer wrappers (`SDTokenizer`) point
at the source to use:
- Qwen 2.5 / 3 and Llama 3: a tokenizer folder ComfyUI ships (`comfy/text_encoders/qwen25_tokenizer`,
  `llama_tokenizer`). It is loaded again with `AutoTokenizer`, not taken from ComfyUI's object: under
  transformers 5 the class ComfyUI names for Llama 3 (`LlamaTokenizerFast`) rebuilds a SentencePiece-
  style pipeline over the byte-level BPE and encodes "a photo of a cat" to other ids than the model
  was trained on; `AutoTokenizer` reads tokenizer.json as written.
- Gemma 2 / 3: the SentencePiece model stored inside the single file (`spiece_model`), converted to
  a fast tokenizer by transformers' GemmaTokenizer, with the turn markers marked special as in
  Gemma's own tokenizer.json.
Chat templates are not taken from here when the adapter recorded its own (TemplateConfig.chat_template).
Tokenizers are cached per source: Llama 3's tokenizer.json alone takes about a second to read.
"""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile

from ..adapter.errors import LLMLoadError

# Gemma's turn markers: user-defined pieces of its SentencePiece model, special tokens in its tokenizer.json.
GEMMA_TURN_TOKENS = ("<start_of_turn>", "<end_of_turn>")


def tokenizer_for(sd_tokenizer):
    """A transformers fast tokenizer equivalent to ComfyUI's `SDTokenizer` (its `.tokenizer` is the source)."""
    inner = getattr(sd_tokenizer, "tokenizer", None)
    proto = _sentencepiece_proto(inner)
    if proto is not None:
        return _gemma_from_sentencepiece(hashlib.sha256(proto).hexdigest(), proto)
    folder = getattr(inner, "name_or_path", None)
    if isinstance(folder, str) and os.path.isdir(folder):
        return _from_folder(os.path.realpath(folder))
    raise LLMLoadError(
        f"cannot find the tokenizer files behind ComfyUI's {type(sd_tokenizer).__name__} "
        f"({type(inner).__name__}); this ComfyUI version packages its tokenizer in a way the pack does not know"
    )


def _sentencepiece_proto(inner) -> bytes | None:
    """The serialized SentencePiece model of ComfyUI's SPieceTokenizer (None for other tokenizers)."""
    processor = getattr(inner, "tokenizer", None)
    serialize = getattr(processor, "serialized_model_proto", None)
    return serialize() if callable(serialize) else None


@functools.lru_cache(maxsize=8)
def _from_folder(folder: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as err:  # a damaged ComfyUI install: say which folder
        raise LLMLoadError(f"cannot load ComfyUI's tokenizer files in {folder}: {err}") from err


@functools.lru_cache(maxsize=4)
def _gemma_from_sentencepiece(digest: str, proto: bytes):
    """A fast Gemma tokenizer from the SentencePiece model bytes (`digest` keys the cache)."""
    from transformers import GemmaTokenizer

    work = tempfile.mkdtemp(prefix="llmdiff-spm-")
    try:
        with open(os.path.join(work, "tokenizer.model"), "wb") as f:
            f.write(proto)
        tokenizer = GemmaTokenizer.from_pretrained(work)  # converts tokenizer.model into a fast tokenizer
    except Exception as err:
        raise LLMLoadError(f"cannot convert the SentencePiece tokenizer stored in the Gemma file: {err}") from err
    finally:
        shutil.rmtree(work, ignore_errors=True)
    vocab = tokenizer.get_vocab()
    turn_tokens = [token for token in GEMMA_TURN_TOKENS if token in vocab]  # never adds new ids
    if turn_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": turn_tokens})
    return tokenizer
