"""LLMDiffLoadLLM: a decoder-only LLM from models/LLM/<name>/, held by ComfyUI's model management."""
from __future__ import annotations

import logging
import os

from comfy_api.latest import io

from .paths import LLM_FOLDER, list_llms, resolve_in_folder
from .types import LLMType

log = logging.getLogger(__name__)


class LLMDiffLoadLLM(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LLMDiffLoadLLM",
            display_name="Load LLM (decoder-only)",
            category="conditioning/llm_diff_adapter",
            description=(
                "Loads a decoder-only LLM (Qwen, Llama, Gemma) in Hugging Face format from models/LLM/<name>/ "
                "(config.json, safetensors weights, tokenizer files). Nothing is downloaded."
            ),
            inputs=[
                io.Combo.Input(
                    "llm_name",
                    options=list_llms(),
                    tooltip="A folder under models/LLM (or an `LLM:` path in extra_model_paths.yaml). "
                    "It must be the LLM the adapter was trained with.",
                ),
                io.Combo.Input(
                    "dtype",
                    options=["auto", "bf16", "fp16", "fp32"],
                    default="auto",
                    tooltip="auto: ComfyUI's text-encoder precision on a GPU, fp32 on a CPU. "
                    "bf16 halves memory and suits most LLMs; fp16 can overflow in some (Gemma).",
                ),
            ],
            outputs=[LLMType.Output(display_name="llm", tooltip="The LLM, for LLM Diff Text Encode.")],
        )

    @classmethod
    def execute(cls, llm_name: str, dtype: str) -> io.NodeOutput:
        import comfy.model_management as mm
        import comfy.utils

        from ..adapter import load_llm
        from .handles import LLMHandle, choose_llm_dtype, file_identity, make_patcher

        path = resolve_in_folder(LLM_FOLDER, llm_name, want_dir=True)
        torch_dtype = choose_llm_dtype(dtype, mm.text_encoder_device())
        progress = comfy.utils.ProgressBar(2)
        log.info("Loading LLM %s from %s (%s)", llm_name, path, torch_dtype)
        # Loaded on the offload device; the encode node asks ComfyUI to move it when it runs.
        loaded = load_llm(path, dtype=torch_dtype, device=mm.text_encoder_offload_device())
        progress.update(1)
        mm.throw_exception_if_processing_interrupted()
        config_stamp = file_identity(os.path.join(path, "config.json"))
        handle = LLMHandle(loaded=loaded, patcher=make_patcher(loaded.model), name=llm_name, identity=f"{config_stamp}|{torch_dtype}")
        progress.update(1)
        return io.NodeOutput(handle)
