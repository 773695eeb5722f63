"""LLMDiffLLMFromCLIP: the decoder-only LLM inside a CLIP from ComfyUI's CLIPLoader, as an LLMDIFF_LLM."""
from __future__ import annotations

from comfy_api.latest import io

from .memory import MEMORY_MODE_TOOLTIP, MEMORY_MODES
from .io_types import LLMType, advanced


class LLMDiffLLMFromCLIP(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LLMDiffLLMFromCLIP",
            display_name="LLM from CLIP loader",
            category="conditioning/llm_diff_adapter",
            description=(
                "Uses an LLM text encoder loaded by ComfyUI's CLIPLoader (Qwen 2.5 3B/7B, Qwen 3 4B, Llama 3 8B, "
                "Gemma 2 2B, Gemma 3 4B single files) as the adapter's LLM: ComfyUI's own implementation, precision "
                "(fp8 included) and memory management, with the adapter's prompt template."
            ),
            inputs=[
                io.Clip.Input("clip", tooltip="From CLIPLoader with an LLM text-encoder file (any type setting). "
                              "It must be the LLM the adapter was trained with (the tokenizer fingerprint is checked)."),
                advanced(io.Combo.Input("memory_mode", options=MEMORY_MODES, default="auto", optional=True,
                                         tooltip=MEMORY_MODE_TOOLTIP)),
            ],
            outputs=[LLMType.Output(display_name="llm", tooltip="The LLM, for LLM Diff Text Encode.")],
        )

    @classmethod
    def execute(cls, clip, memory_mode: str = "auto") -> io.NodeOutput:
        from .comfy_llm import handle_from_clip, weights_identity
        from .memory import check_memory_mode

        check_memory_mode(memory_mode)
        # The CLIP does not know its file name: the handle is named after ComfyUI's class for the model.
        return io.NodeOutput(handle_from_clip(clip, None, identity=weights_identity(clip), memory_mode=memory_mode))
