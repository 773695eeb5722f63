"""LLMDiffTextEncode: prompt -> LLM (every layer) -> adapter -> plain CONDITIONING, optionally with CLIP beside it."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from .types import AdapterType, LLMType, advanced

log = logging.getLogger(__name__)

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
        import comfy.model_management as mm
        import comfy.utils

        from ..adapter import check_context_dim
        from .conditioning import build_conditioning
        from .encode import encode_with_adapter, encode_with_clip, encode_with_foreign
        from .info_text import ITEM, describe_encoding, describe_foreign
        from .input_checks import check_finite, sanitize_text
        from .prompt_weights import strip_prompt_weights
        from ..adapter.foreign import is_foreign
        from ..adapter.foreign.text import check_pairing, node_text_side

        check_finite("LLM Diff Text Encode", llm_strength=llm_strength, clip_strength=clip_strength, pooled_blend=pooled_blend)
        text, replaced = sanitize_text(text, "the prompt")
        system_prompt, replaced_system = sanitize_text(system_prompt, "the system prompt")
        config = adapter.config
        foreign = is_foreign(config)
        # Before any work: names both sides and the fix (a T5 encoder with a Gemma adapter, and so on).
        check_pairing(config, llm.loaded, adapter.name, llm.name)
        side = node_text_side(config, llm.loaded, system_prompt, skip_first, t5_padding, llm.backend) if foreign else None
        if clip_mode == "concat" and clip is None:
            raise ValueError("clip_mode is 'concat' but no CLIP is connected: connect the checkpoint's CLIP or set clip_mode to 'none'.")
        progress = comfy.utils.ProgressBar(2)
        notes: list[str] = [note for note in (replaced, replaced_system) if note]

        llm_text, stripped = strip_prompt_weights(text)
        if stripped:
            notes.append("A1111 weights/escapes such as (word:1.2) were removed from the LLM's text" + (" (CLIP honours them)" if clip is not None else ""))
        encoding = encode_with_foreign(llm, adapter, llm_text, side) if foreign else encode_with_adapter(llm, adapter, llm_text)
        if encoding.from_cache:
            notes.append("reused the cached encoding of this prompt (the LLM did not run)")
        progress.update(1)

        clip_context = clip_pooled = None
        if clip is not None:
            clip_context, clip_pooled = encode_with_clip(clip, text)
            wants_pooled = config.target.pooled_dim is not None and clip_pooled is not None
            check_context_dim(config, clip_context.shape[-1], clip_pooled.shape[-1] if wants_pooled else None, "the CLIP connected to LLM Diff Text Encode")
        mm.throw_exception_if_processing_interrupted()
        progress.update(1)

        is_sdxl = config.target.pooled_dim is not None
        sizes = (width, height, crop_w, crop_h, target_width, target_height)
        notes.extend(_ignored_inputs(config, is_sdxl, clip is not None, clip_mode, pooled_blend, sizes, adapter.module.timestep_aware))
        notes.extend(_ignored_text_settings(config, side, system_prompt, skip_first, t5_padding))
        conditioning = build_conditioning(
            encoding.context, encoding.pooled, clip_context=clip_context, clip_pooled=clip_pooled,
            concat_clip=clip_mode == "concat", llm_strength=llm_strength, clip_strength=clip_strength,
            pooled_blend=pooled_blend if is_sdxl else 0.0, device=mm.intermediate_device(),
            sdxl_size=dict(width=width, height=height, crop_w=crop_w, crop_h=crop_h, target_width=target_width, target_height=target_height) if is_sdxl else None,
        )
        _check_conditioning_finite(conditioning, encoding, llm.name, adapter.name)
        if encoding.states is not None:  # timestep-aware: the states Apply LLM Diff Adapter decodes at every step
            from .step_states import attach_step_states

            conditioning = attach_step_states(conditioning, encoding, adapter, llm, llm_strength)
        if foreign:
            info = describe_foreign(llm_name=llm.name, llm_info=llm.info, adapter_name=adapter.name, config=config, side=side,
                                    prompt_info=encoding.prompt_info, notes=notes)
        else:
            info = describe_encoding(llm_name=llm.name, llm_info=llm.info, adapter_name=adapter.name, config=config, prompt_info=encoding.prompt_info, notes=notes)
        for line in info.splitlines():
            if line.removeprefix(ITEM).startswith(("warning:", "truncated:")):
                log.warning("LLM Diff Text Encode: %s", line.removeprefix(ITEM))
        return io.NodeOutput(conditioning, info)


def _check_conditioning_finite(conditioning, encoding, llm_name: str, adapter_name: str) -> None:
    """Refuse to hand a sampler NaN or infinite conditioning (it would draw a black image and report success)."""
    import torch

    tokens, extras = conditioning[0]
    pooled = extras.get("pooled_output")
    if bool(torch.isfinite(tokens).all()) and (pooled is None or bool(torch.isfinite(pooled).all())):
        return
    adapter_bad = not bool(torch.isfinite(encoding.context).all()) or (
        encoding.pooled is not None and not bool(torch.isfinite(encoding.pooled).all()))
    source = (f"the adapter {adapter_name} with the LLM {llm_name} (a damaged or diverged adapter file, or an LLM in a "
              "precision that overflows: try dtype fp32 or bf16)" if adapter_bad else "the connected CLIP")
    raise ValueError(f"LLM Diff Text Encode: the conditioning holds NaN or infinite values, produced by {source}; "
                     "nothing was passed on to the sampler.")


def _ignored_inputs(config, is_sdxl: bool, has_clip: bool, clip_mode: str, pooled_blend: float, sizes: tuple,
                    timestep_aware: bool) -> list[str]:
    """Say which settings had no effect, so a user does not tune a knob that does nothing."""
    notes = []
    if not is_sdxl and sizes != (DEFAULT_SIZE, DEFAULT_SIZE, 0, 0, DEFAULT_SIZE, DEFAULT_SIZE):
        notes.append(f"width/height/crop/target fields are SDXL-only and were ignored for this {config.target.family} adapter")
    if pooled_blend > 0 and not (is_sdxl and has_clip):
        notes.append("pooled_blend was ignored: it needs an SDXL adapter and a connected CLIP")
    if timestep_aware:
        from ..adapter.model import FALLBACK_TIMESTEP

        notes.append(f"this adapter is timestep-aware: with the MODEL passed through 'Apply LLM Diff Adapter "
                     "(timestep-aware)', as in the shipped timestep-aware workflow, its context is recomputed at every "
                     f"sampling step's real timestep; without that node the sampler uses the context at the fixed "
                     f"timestep {FALLBACK_TIMESTEP:g}")
    if config.concat_clip and clip_mode != "concat":
        notes.append("this adapter was trained with CLIP tokens beside its own: set clip_mode to 'concat' and connect the CLIP for the results it was trained for")
    if not config.concat_clip and clip_mode == "concat":
        notes.append("this adapter was trained without CLIP tokens; 'concat' adds them anyway (lower clip_strength if they dominate)")
    return notes


def _ignored_text_settings(config, side, system_prompt: str, skip_first: int, t5_padding: str) -> list[str]:
    """The published adapters' text settings that do nothing for this adapter."""
    notes = []
    gemma = side is not None and side.encoder in ("gemma_chat", "any")
    encoder = side is not None and side.encoder in ("t5", "t5gemma")
    if (system_prompt or skip_first != -1) and not gemma:
        notes.append("system_prompt / skip_first are for RouWei-Gemma adapters and were ignored" +
                     ("" if side is not None else " (this adapter's file holds its own prompt template)"))
    if t5_padding != "max_length" and not encoder:
        notes.append("t5_padding is for ELLA / RouWei-T5Gemma adapters and was ignored")
    return notes
