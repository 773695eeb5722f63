"""The LLM Diff Adapter library: every layer of a decoder-only LLM in, Stable Diffusion conditioning out.

Pure PyTorch + transformers, no ComfyUI imports, so the nodes and the trainer share one
implementation (and one file format). See docs/internals.md for the contracts.
"""
from .config import TARGETS, AdapterConfig, ArchConfig, LLMInfo, TargetSpec, TemplateConfig, make_target
from .errors import AdapterError, AdapterFileError, AdapterMismatchError, ConfigError, LLMLoadError
from .fingerprint import tokenizer_fingerprint
from .template import PromptInfo, TokenizedPrompts, record_chat_template, tokenize_prompts
from .llm import LoadedLLM, encode_prompts, load_llm, run_llm
from .attention import attention
from .model import AdapterOutput, LLMDiffAdapter
from .file_format import (
    FORMAT,
    FORMAT_VERSION,
    check_context_dim,
    check_llm_matches,
    load_adapter,
    read_adapter_config,
    save_adapter,
)

__all__ = [
    "TARGETS", "AdapterConfig", "ArchConfig", "LLMInfo", "TargetSpec", "TemplateConfig", "make_target",
    "AdapterError", "AdapterFileError", "AdapterMismatchError", "ConfigError", "LLMLoadError",
    "tokenizer_fingerprint", "PromptInfo", "TokenizedPrompts", "record_chat_template", "tokenize_prompts",
    "LoadedLLM", "encode_prompts", "load_llm", "run_llm",
    "attention", "AdapterOutput", "LLMDiffAdapter",
    "FORMAT", "FORMAT_VERSION", "check_context_dim", "check_llm_matches", "load_adapter",
    "read_adapter_config", "save_adapter",
]
