"""LLMDiffEnhancePrompt: expand a short prompt into a dense caption with the loaded LLM (adapter/generate.py)."""
from __future__ import annotations

from comfy_api.latest import io

from .io_types import LLMType, advanced

MAX_NEW_TOKENS = 2048
# The node's default request (kept here, not in adapter/, so building the schema imports nothing heavy).
DEFAULT_INSTRUCTION = (
    "Rewrite the image prompt below as one dense, detailed caption of the image it describes: the subjects and "
    "their attributes (colour, material, size, count), their positions and relations, the setting, lighting, "
    "camera view and style. Keep everything the prompt asks for and add nothing that contradicts it. Answer "
    "with the caption only, in one paragraph."
)


class LLMDiffEnhancePrompt(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LLMDiffEnhancePrompt",
            display_name="Enhance prompt with LLM",
            category="conditioning/llm_diff_adapter",
            description=(
                "Rewrites a short prompt as a dense visual caption with the loaded LLM (the same weights, no second "
                "copy). Adapters trained on dense captions do best with them. Same seed, same text."
            ),
            inputs=[
                LLMType.Input("llm", tooltip="From Load LLM (decoder-only): it needs its output layer (tied embeddings "
                              "or lm_head weights in the folder); an instruct/chat model follows the instruction best."),
                io.String.Input("text", multiline=True, dynamic_prompts=True, tooltip="The short prompt to expand."),
                io.String.Input("instruction", multiline=True, default=DEFAULT_INSTRUCTION,
                                tooltip="What the LLM is asked to do with the text (sent with it in one user turn of the "
                                "chat template). The default asks for one dense visual caption."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Sampling seed: the same seed, text and LLM give the same result."),
                io.Int.Input("max_new_tokens", default=256, min=1, max=MAX_NEW_TOKENS,
                             tooltip="At most this many tokens are generated (the adapter reads at most its own token "
                                     "budget, 256 by default, of the result)."),
                advanced(io.Float.Input("temperature", default=0.7, min=0.0, max=2.0, step=0.05, optional=True,
                                         tooltip="Sampling temperature; 0 = greedy (the seed then has no effect).")),
                advanced(io.Float.Input("top_p", default=0.9, min=0.05, max=1.0, step=0.05, optional=True,
                                         tooltip="Nucleus sampling: only the most likely tokens up to this total "
                                                 "probability are drawn from; 1 = off.")),
            ],
            outputs=[io.String.Output(display_name="text", tooltip="The enhanced prompt, for LLM Diff Text Encode.")],
        )

    @classmethod
    def execute(cls, llm, text: str, instruction: str, seed: int, max_new_tokens: int, temperature: float = 0.7,
                top_p: float = 0.9) -> io.NodeOutput:
        from .generate import generate_text
        from .input_checks import check_finite, sanitize_text

        check_finite("Enhance prompt with LLM", temperature=temperature, top_p=top_p)
        text, _ = sanitize_text(text, "the text")  # the LLM reads U+FFFD; the caption it writes is the output
        instruction, _ = sanitize_text(instruction, "the instruction")
        if not text.strip():
            raise ValueError("Enhance prompt with LLM: the text is empty; write a short prompt for the LLM to expand.")
        return io.NodeOutput(generate_text(llm, text, instruction, max_new_tokens=max_new_tokens, seed=seed,
                                           temperature=temperature, top_p=top_p))
