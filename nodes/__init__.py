"""ComfyUI nodes of the LLM Diff Adapter pack: thin glue over `adapter/` (see the README).

Importing this package loads only ComfyUI's node API and our schemas; torch-heavy work and the
adapter library (transformers) are imported inside `execute`, when a node first runs.
"""
from .load_adapter import LLMDiffLoadAdapter
from .load_llm import LLMDiffLoadLLM
from .text_encode import LLMDiffTextEncode

NODES = [LLMDiffLoadLLM, LLMDiffLoadAdapter, LLMDiffTextEncode]
