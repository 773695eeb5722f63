"""LLMDiffLoadLLM: a decoder-only LLM from models/LLM/<name>/, held by ComfyUI's model management."""
from __future__ import annotations

from comfy_api.latest import io

from .memory import MEMORY_MODE_TOOLTIP, MEMORY_MODES
from .llm_files import list_llm_files
from .paths import LLM_FOLDER, list_llms, resolve_in_folder
from .io_types import LLMType, advanced

# The values adapter.quantization.QUANTIZATIONS accepts. Written out, not imported: loading the pack may import
# nothing outside nodes/ (adapter/ pulls in transformers); test_nodes_schema.py checks the two agree.
QUANTIZATIONS = ["none", "8bit", "4bit"]


class LLMDiffLoadLLM(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LLMDiffLoadLLM",
            display_name="Load LLM (decoder-only)",
            category="conditioning/llm_diff_adapter",
            description=(
                "Loads a decoder-only LLM (Qwen, Llama, Gemma) in Hugging Face format from its own folder in models/LLM "
                "(config.json, safetensors weights, tokenizer files), or a single-file text encoder from "
                "models/text_encoders through ComfyUI's own implementation. Nothing is downloaded."
            ),
            inputs=[
                io.Combo.Input(
                    "llm_name",
                    options=list_llms() + list_llm_files(),
                    tooltip="A folder under models/LLM (or an `LLM:` path in extra_model_paths.yaml), or a "
                    "text_encoders/ single file that ComfyUI loads itself (Qwen 2.5/3, Llama 3, Gemma 2/3 text "
                    "encoders). It must be the LLM the adapter was trained with.",
                ),
                io.Combo.Input(
                    "dtype",
                    options=["auto", "bf16", "fp16", "fp32"],
                    default="auto",
                    tooltip="auto: ComfyUI's text-encoder precision on a GPU, fp32 on a CPU. "
                    "bf16 halves memory and suits most LLMs; fp16 can overflow in some (Gemma). "
                    "Folders only: a text_encoders/ file keeps its own precision (fp8 included), as in CLIPLoader.",
                ),
                advanced(io.Combo.Input("memory_mode", options=MEMORY_MODES, default="auto", optional=True,
                                         tooltip=MEMORY_MODE_TOOLTIP)),
                advanced(io.Combo.Input(
                    "quantization", options=QUANTIZATIONS, default="none", optional=True,
                    tooltip="8bit / 4bit: load a Hugging Face folder quantised by bitsandbytes (about 1/2 or 1/4 of "
                    "the bf16 memory; needs an NVIDIA GPU and `pip install bitsandbytes`). The quantised LLM stays on "
                    "the GPU. none: the dtype above.",
                )),
            ],
            outputs=[LLMType.Output(display_name="llm", tooltip="The LLM, for LLM Diff Text Encode.")],
        )

    @classmethod
    def fingerprint_inputs(cls, llm_name: str, **_) -> str:
        """ComfyUI reruns the node when this changes: a folder or file replaced under the same name is loaded again."""
        from .handles import file_identity, folder_identity
        from .llm_files import resolve_llm_file

        try:
            file_path = resolve_llm_file(llm_name)
            if file_path is not None:
                return file_identity(file_path)
            return folder_identity(resolve_in_folder(LLM_FOLDER, llm_name, want_dir=True))
        except (OSError, ValueError):  # missing or not an LLM: execute raises the message that says what to do
            return f"unresolved:{llm_name}"

    @classmethod
    def validate_inputs(cls, llm_name: str | None = None) -> bool | str:
        """Before anything runs: ComfyUI then lists every loader whose file is missing in one error report."""
        if llm_name is None:  # fed by a link: known only at execution
            return True
        from .llm_files import resolve_llm_file

        try:
            if resolve_llm_file(llm_name) is None:
                resolve_in_folder(LLM_FOLDER, llm_name, want_dir=True)
        except (ValueError, FileNotFoundError) as err:
            return str(err)
        return True

    @classmethod
    def execute(cls, llm_name: str, dtype: str, memory_mode: str = "auto", quantization: str = "none") -> io.NodeOutput:
        from .handles import load_llm_folder
        from .llm_files import load_llm_file, resolve_llm_file
        from .memory import check_memory_mode

        check_memory_mode(memory_mode)
        file_path = resolve_llm_file(llm_name)
        if file_path is not None:  # a single file: ComfyUI's own implementation, precision and memory handling
            return io.NodeOutput(load_llm_file(file_path, llm_name, memory_mode, dtype=dtype, quantization=quantization))
        path = resolve_in_folder(LLM_FOLDER, llm_name, want_dir=True)
        return io.NodeOutput(load_llm_folder(path, llm_name, dtype, memory_mode, quantization))
