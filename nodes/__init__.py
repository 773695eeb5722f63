"""ComfyUI nodes of the LLM Diff Adapter pack: thin glue over `adapter/` (see the README).

Importing this package loads only ComfyUI's node API and our schemas; torch-heavy work and the
adapter library (transformers) are imported inside `execute`, when a node first runs.
"""
from .apply_adapter import LLMDiffApplyAdapter
from .enhance_prompt import LLMDiffEnhancePrompt
from .load_adapter import LLMDiffLoadAdapter
from .llm_from_clip import LLMDiffLLMFromCLIP
from .load_llm import LLMDiffLoadLLM
from .text_encode import LLMDiffTextEncode

NODES = [LLMDiffLoadLLM, LLMDiffLLMFromCLIP, LLMDiffLoadAdapter, LLMDiffTextEncode, LLMDiffApplyAdapter, LLMDiffEnhancePrompt]
