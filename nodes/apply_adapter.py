"""LLMDiffApplyAdapter: a model clone that conditions every UNet call at its real timestep."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from .io_types import AdapterType

log = logging.getLogger(__name__)


class LLMDiffApplyAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LLMDiffApplyAdapter",
            display_name="Apply LLM Diff Adapter (timestep-aware)",
            category="conditioning/llm_diff_adapter",
            description=(
                "Patches a copy of the model so that, at every sampling step, each conditioning from LLM Diff Text "
                "Encode made with a timestep-aware adapter gets the adapter's context at that step's real timestep "
                "(any sampler, scheduler, denoise and ControlNet). Without this node such conditioning uses the fixed "
                "fallback timestep. The LLM does not run again; a static adapter's conditioning passes unchanged."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The SD1.5, SD2 or SDXL model the sampler will use. It is not changed: "
                               "a patched copy is returned."),
                AdapterType.Input("adapter", tooltip="The same adapter (Load LLM Diff Adapter) that LLM Diff Text Encode "
                                  "used for this model's conditioning."),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="The model with timestep-aware LLM Diff conditioning, for KSampler.")],
        )

    @classmethod
    def execute(cls, model, adapter) -> io.NodeOutput:
        from ..adapter import check_context_dim
        from .timestep_aware.wrapper import context_width, patch_model

        # Before any sampling: an adapter for another model family fails here, naming both widths.
        check_context_dim(adapter.config, context_width(model), None, "the MODEL connected to Apply LLM Diff Adapter")
        if not adapter.module.timestep_aware:
            log.info("Apply LLM Diff Adapter: %s is a static adapter; its conditioning is already exact at every "
                     "timestep and passes through unchanged", adapter.name)
        return io.NodeOutput(patch_model(model, adapter))
