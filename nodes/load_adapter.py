"""LLMDiffLoadAdapter: an LLM Diff Adapter file from models/llm_adapters/, held by ComfyUI's model management."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from .paths import ADAPTER_FOLDER, list_adapters, resolve_in_folder
from .io_types import AdapterType

log = logging.getLogger(__name__)


class LLMDiffLoadAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LLMDiffLoadAdapter",
            display_name="Load LLM Diff Adapter",
            category="conditioning/llm_diff_adapter",
            description=(
                "Loads an LLM Diff Adapter (.safetensors from models/llm_adapters). The file records the LLM "
                "it was trained with, its prompt template and its target (SD1.5, SD2 or SDXL). Published RouWei-Gemma "
                "(SDXL) and ELLA (SD1.5) files load too, recognised by their tensor layout."
            ),
            inputs=[
                io.Combo.Input(
                    "adapter_name",
                    options=list_adapters(),
                    tooltip="A .safetensors file under models/llm_adapters (or an `llm_adapters:` path in "
                    "extra_model_paths.yaml), as exported by `python -m training.train`.",
                ),
            ],
            outputs=[
                AdapterType.Output(display_name="adapter", tooltip="The adapter, for LLM Diff Text Encode."),
                io.String.Output(display_name="info", tooltip="What the file is: its kind, preset, target and sizes."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, adapter_name: str, **_) -> str:
        """ComfyUI reruns the node when this changes: a file replaced under the same name is loaded again."""
        from .handles import file_identity

        try:
            return file_identity(resolve_in_folder(ADAPTER_FOLDER, adapter_name, want_dir=False))
        except (OSError, ValueError):  # missing: execute raises the message that says what to do
            return f"unresolved:{adapter_name}"

    @classmethod
    def validate_inputs(cls, adapter_name: str | None = None) -> bool | str:
        """Before anything runs: ComfyUI then lists every loader whose file is missing in one error report."""
        if adapter_name is None:  # fed by a link: known only at execution
            return True
        try:
            resolve_in_folder(ADAPTER_FOLDER, adapter_name, want_dir=False)
        except (ValueError, FileNotFoundError) as err:
            return str(err)
        return True

    @classmethod
    def execute(cls, adapter_name: str) -> io.NodeOutput:
        import torch

        import comfy.model_management as mm
        import comfy.utils

        from ..adapter.foreign import describe_adapter, load_any_adapter
        from .handles import AdapterHandle, file_identity, make_patcher

        path = resolve_in_folder(ADAPTER_FOLDER, adapter_name, want_dir=False)
        progress = comfy.utils.ProgressBar(1)
        log.info("Loading LLM Diff Adapter %s", path)
        # fp32 always: the adapter is small (tens of millions of weights) and its output feeds
        # every UNet step, so rounding here would cost more than the memory it saves.
        module = load_any_adapter(path, device=mm.text_encoder_offload_device(), dtype=torch.float32)
        module.eval()
        progress.update(1)
        info = describe_adapter(module)
        log.info("LLM Diff Adapter %s: %s", adapter_name, info)
        handle = AdapterHandle(module=module, patcher=make_patcher(module), name=adapter_name, identity=file_identity(path))
        return io.NodeOutput(handle, info)
