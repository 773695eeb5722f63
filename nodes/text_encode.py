"""LLMDiffTextEncode: prompt -> LLM (every layer) -> adapter -> plain CONDITIONING, optionally with CLIP beside it."""
from __future__ import annotations

from comfy_api.latest import io

from .io_types import AdapterType, LLMType, advanced

MAX_RESOLUTION = 16384  # nodes.MAX_RESOLUTION; not imported so the schema needs nothing heavy
DEFAULT_SIZE = 1024  # SDXL's native size, as in CLIPTextEncodeSDXL
SIZE_TIP = "SDXL size conditioning ({}), as in CLIPTextEncodeSDXL. Ignored for SD1.5 / SD2 adapters."


def _size_input(name: str, default: int, what: str) -> io.Input:
    return advanced(io.Int.Input(name, default=default, min=0, max=MAX_RESOLUTION, step=8, optional=True, tooltip=SIZE_TIP.format(what)))


class LLMDiffTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LLMDiffTextEncode",
            display_name="LLM Diff Text Encode",
            category="conditioning/llm_diff_adapter",
            description=(
                "Encodes a prompt with a decoder-only LLM and an LLM Diff Adapter into ordinary CONDITIONING "
                "for an SD1.5, SD2 or SDXL model. An empty prompt gives the adapter's empty-prompt conditioning "
                "(use it as the negative)."
            ),
            inputs=[
                LLMType.Input("llm", tooltip="From Load LLM (decoder-only): the LLM the adapter was trained with."),
                AdapterType.Input("adapter", tooltip="From Load LLM Diff Adapter."),
                io.String.Input(
                    "text", multiline=True, dynamic_prompts=True,
                    tooltip="The prompt, in natural language. Empty = the adapter's empty-prompt conditioning. "
                    "A1111 weights like (word:1.2) are removed for the LLM and honoured by CLIP.",
                ),
                io.Clip.Input(
                    "clip", optional=True,
                    tooltip="Optional CLIP of the checkpoint: checks the adapter fits the model, supplies SDXL's pooled "
                    "vector for pooled_blend and CLIP tokens for clip_mode 'concat'.",
                ),
                io.Combo.Input(
                    "clip_mode", options=["none", "concat"], default="none", optional=True,
                    tooltip="none: adapter tokens only. concat: CLIP's tokens for the same text after the adapter's, "
                    "so trigger words, embeddings and tag prompts keep working (needs clip).",
                ),
                io.Float.Input(
                    "llm_strength", default=1.0, min=0.0, max=10.0, step=0.01, optional=True,
                    tooltip="Multiplies the adapter's tokens.",
                ),
                io.Float.Input(
                    "clip_strength", default=1.0, min=0.0, max=10.0, step=0.01, optional=True,
                    tooltip="Multiplies CLIP's tokens in clip_mode 'concat'.",
                ),
                advanced(io.Float.Input(
                    "pooled_blend", default=0.0, min=0.0, max=1.0, step=0.01, optional=True,
                    tooltip="SDXL pooled vector: 0 = the adapter's, 1 = CLIP's (needs clip), in between = a mix.",
                )),
                _size_input("width", DEFAULT_SIZE, "original width"),
                _size_input("height", DEFAULT_SIZE, "original height"),
                _size_input("crop_w", 0, "crop left"),
                _size_input("crop_h", 0, "crop top"),
                _size_input("target_width", DEFAULT_SIZE, "target width"),
                _size_input("target_height", DEFAULT_SIZE, "target height"),
                advanced(io.String.Input(
                    "system_prompt", multiline=True, default="", optional=True,
                    tooltip="RouWei-Gemma adapters only: the system turn of Gemma's chat template. Empty = the text the "
                    "adapter was trained with (see docs/public_adapters.md). Our own adapters keep the template in their file.",
                )),
                advanced(io.Int.Input(
                    "skip_first", default=-1, min=-1, max=4096, optional=True,
                    tooltip="RouWei-Gemma adapters only: leading template tokens dropped before the adapter. -1 = the "
                    "reference value (27: the template and default system prompt). `info` warns when it does not fit.",
                )),
                advanced(io.Combo.Input(
                    "t5_padding", options=["max_length", "flexible"], default="max_length", optional=True,
                    tooltip="ELLA / RouWei-T5Gemma adapters only: max_length pads the encoder input to the adapter's "
                    "length (ELLA 128, T5Gemma 512; the reference default); flexible feeds the prompt's own tokens (ELLA's "
                    "option for short prompts).",
                )),
            ],
            outputs=[
                io.Conditioning.Output(display_name="CONDITIONING", tooltip="Plain conditioning for any sampler or conditioning node."),
                io.String.Output(display_name="info", tooltip="Tokens used, what was truncated, and any warning."),
            ],
        )

    @classmethod
    def execute(
        cls, llm, adapter, text: str, clip=None, clip_mode: str = "none", llm_strength: float = 1.0,
        clip_strength: float = 1.0, pooled_blend: float = 0.0, width: int = DEFAULT_SIZE, height: int = DEFAULT_SIZE,
        crop_w: int = 0, crop_h: int = 0, target_width: int = DEFAULT_SIZE, target_height: int = DEFAULT_SIZE,
        system_prompt: str = "", skip_first: int = -1, t5_padding: str = "max_length",
    ) -> io.NodeOutput:
        from .encode import encode_prompt
        from .input_checks import check_finite

        check_finite("LLM Diff Text Encode", llm_strength=llm_strength, clip_strength=clip_strength, pooled_blend=pooled_blend)
        conditioning, info = encode_prompt(
            llm, adapter, text, clip, clip_mode=clip_mode, llm_strength=llm_strength, clip_strength=clip_strength,
            pooled_blend=pooled_blend, sdxl_size=dict(width=width, height=height, crop_w=crop_w, crop_h=crop_h,
                                                      target_width=target_width, target_height=target_height),
            system_prompt=system_prompt, skip_first=skip_first, t5_padding=t5_padding,
        )
        return io.NodeOutput(conditioning, info)
