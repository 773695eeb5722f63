"""The pack's wire types. Their names are saved in workflows: never rename them."""
from comfy_api.latest import io

LLMType = io.Custom("LLMDIFF_LLM")  # carries nodes.handles.LLMHandle
AdapterType = io.Custom("LLMDIFF_ADAPTER")  # carries nodes.handles.AdapterHandle
