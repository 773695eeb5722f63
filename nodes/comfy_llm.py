"""A decoder-only LLM that ComfyUI built (CLIPLoader, or a single file in models/text_encoders) as the adapter's LLM.

ComfyUI implements the LLM text encoders of recent image models in `comfy/text_encoders/llama.py`
(Qwen 2.5 3B/7B, Qwen 3 4B, Llama 3 8B, Gemma 2 2B, Gemma 3 4B), built from `comfy.ops` layers so
that its model management can load, offload, partially load and cast them (fp8 weights included).
`ComfyLLM` runs that implementation and gives the adapter the same thing `adapter.LoadedLLM` does
(the backend contract, docs/internals.md): `.tokenizer`, `.info`, `.device` and
`.hidden_states(input_ids, attention_mask) -> [B, L+1, T, H]`, the pre-final-norm residual stream.

What ComfyUI's forward returns with `intermediate_output="all"` (Llama2_.forward): the state before
each block (embedding output, after Gemma's sqrt(H) scaling, then the output of blocks 1..L-1) and,
as entry L+1, the output of the final norm; `final_layer_norm_intermediate=False` keeps the norm off
the others. The last block's own output is the final norm's INPUT: a forward pre-hook captures it and
replaces the last entry, exactly as adapter.run_llm does for transformers. ComfyUI computes its text
encoders in fp32 whatever the weights' storage (the `dtype=torch.float32` its SDClipModel passes;
comfy.ops casts each layer's fp16/bf16/fp8 weights on the fly), so these states are fp32, and inputs
go where the embedding's weights are, as in SDClipModel.forward.

The prompt template is the adapter's (adapter.tokenize_prompts); ComfyUI's built-in system prompts
(Omnigen2's, Z-Image's, ...) live in its tokenizer wrappers, which are never called.
"""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..adapter.config import LLMInfo
from ..adapter.errors import LLMLoadError
from ..adapter.fingerprint import tokenizer_fingerprint
from .comfy_tokenizer import tokenizer_for
from .handles import LLMHandle

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ComfyFamily:
    """What ComfyUI's class for one model corresponds to in Hugging Face terms."""

    architecture: str  # config.architectures[0] of the model's Hugging Face release
    model_type: str
    tie_word_embeddings: bool  # the generation head is the input embedding (no lm_head in ComfyUI's files)
    final_logit_softcapping: Optional[float] = None
    known_difference: str = ""  # where ComfyUI's implementation differs from transformers'


# ComfyUI class name (comfy.text_encoders.llama) -> the family. Classes not listed are not offered.
FAMILIES: dict[str, ComfyFamily] = {
    "Qwen25_3B": ComfyFamily("Qwen2ForCausalLM", "qwen2", True),
    "Qwen25_7BVLI": ComfyFamily("Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl", False),
    "Qwen3_4B": ComfyFamily("Qwen3ForCausalLM", "qwen3", True),
    "Llama2": ComfyFamily("LlamaForCausalLM", "llama", False),  # ComfyUI's class for Llama 3 8B (HiDream)
    "Gemma2_2B": ComfyFamily(
        "Gemma2ForCausalLM", "gemma2", True, final_logit_softcapping=30.0,
        known_difference="ComfyUI's Gemma 2 leaves out attention-logit soft-capping (50), so its states differ "
        "from the Hugging Face model's wherever attention logits are large (tests/unit/test_comfy_llm_parity.py); "
        "an adapter trained on the Hugging Face Gemma 2 may do worse here",
    ),
    "Gemma3_4B": ComfyFamily("Gemma3ForConditionalGeneration", "gemma3", True),
}
SUPPORTED = "Qwen 2.5 (3B, 7B VL), Qwen 3 4B, Llama 3 8B, Gemma 2 2B, Gemma 3 4B"
_IDENTITY_ATTR = "_llm_diff_identity"  # stamped on ComfyUI's module: identifies these weights for the encode cache


class ComfyLLM:
    """ComfyUI's decoder (a comfy.text_encoders.llama.BaseLlama) behind the adapter.LoadedLLM contract."""

    def __init__(self, model: nn.Module, tokenizer, info: LLMInfo, family: ComfyFamily):
        self.model = model  # ComfyUI's BaseLlama: .model is its Llama2_ (embed_tokens, layers, norm)
        self.tokenizer = tokenizer
        self.info = info
        self.family = family
        self.tie_word_embeddings = family.tie_word_embeddings
        self.compute_dtype = torch.float32  # ComfyUI runs its text encoders in fp32 whatever the storage
        self.final_logit_softcapping = family.final_logit_softcapping

    @property
    def device(self) -> torch.device:
        """Where the embedding's weights are now (ComfyUI's patcher moves them): inputs go there."""
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The weights' storage dtype (computation is fp32)."""
        return self.model.get_input_embeddings().weight.dtype

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, L+1, T, H] fp32: the embedding output and the residual after each block, before the final norm."""
        norm = self.model.model.norm
        norm_inputs: list[torch.Tensor] = []
        hook = norm.register_forward_pre_hook(lambda module, args: norm_inputs.append(args[0])) if norm is not None else None
        try:
            _, states = self.model(input_ids.to(self.device), attention_mask.to(self.device), intermediate_output="all",
                                   final_layer_norm_intermediate=False, dtype=torch.float32)
        finally:
            if hook is not None:
                hook.remove()
        layers = len(self.model.model.layers)
        if states.shape[1] != layers + 1 or (norm is not None and len(norm_inputs) != 1):
            raise LLMLoadError(f"ComfyUI's {type(self.model).__name__} returned {states.shape[1]} states for {layers} "
                               "blocks; this ComfyUI version's LLM forward is not supported")
        if norm is not None:
            states[:, -1] = norm_inputs[0]  # ComfyUI's last entry is after the final norm: use the norm's input
        return states

    def final_hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, T, H] fp32 after the final norm (what a generation head reads), causal, no padding."""
        out, _ = self.model(input_ids.to(self.device), None, dtype=torch.float32)
        return out


def find_llm(clip) -> tuple[str, nn.Module]:
    """(attribute name, SDClipModel) of the decoder-only LLM inside a ComfyUI CLIP; a clear error otherwise."""
    from comfy.sd1_clip import SDClipModel
    from comfy.text_encoders.llama import BaseLlama

    root = getattr(clip, "cond_stage_model", None)
    if root is None:
        raise ValueError("LLM from CLIP loader needs a CLIP from ComfyUI's CLIPLoader (or a checkpoint loader); "
                         f"got {type(clip).__name__}")
    found, others = [], []
    for name, module in root.named_modules():
        if isinstance(module, SDClipModel):
            (found if isinstance(module.transformer, BaseLlama) else others).append((name, module))
    if not found:
        kinds = ", ".join(sorted({type(m.transformer).__name__ for _, m in others})) or type(root).__name__
        raise ValueError(
            f"this CLIP holds no decoder-only LLM (it contains {kinds}): an SD1.5/SDXL CLIP or a T5 cannot feed an "
            f"LLM Diff Adapter. Load an LLM text encoder with CLIPLoader instead ({SUPPORTED})."
        )
    if len(found) > 1:
        raise ValueError(f"this CLIP holds {len(found)} LLMs ({', '.join(n for n, _ in found)}); load the one the "
                         "adapter was trained with on its own with CLIPLoader")
    name, module = found[0]
    kind = type(module.transformer).__name__
    if kind not in FAMILIES:
        raise ValueError(f"ComfyUI's {kind} is not supported by the LLM Diff Adapter pack (supported: {SUPPORTED})")
    return name, module


def comfy_llm(clip, name: Optional[str] = None) -> ComfyLLM:
    """The CLIP's LLM with its tokenizer and LLMInfo (fingerprint computed from the tokenizer).

    `name` (shown in info) defaults to ComfyUI's class for the model, e.g. "Qwen25_3B from CLIPLoader".
    """
    attr, sd_clip_model = find_llm(clip)
    sd_tokenizer = getattr(clip.tokenizer, attr.split(".")[-1], None)
    if sd_tokenizer is None:
        raise LLMLoadError(f"ComfyUI's CLIP has no tokenizer named {attr!r} beside its LLM; this ComfyUI version "
                           "is not supported")
    model = sd_clip_model.transformer
    family = FAMILIES[type(model).__name__]
    tokenizer = tokenizer_for(sd_tokenizer)
    config = model.model.config
    name = name or f"{type(model).__name__} from CLIPLoader"
    info = LLMInfo(architecture=family.architecture, model_type=family.model_type, hidden_size=int(config.hidden_size),
                   num_layers=len(model.model.layers), tokenizer_fingerprint=tokenizer_fingerprint(tokenizer), name=name)
    if family.known_difference:
        log.warning("%s: %s", name, family.known_difference)
    return ComfyLLM(model, tokenizer, info, family)


def weights_identity(clip) -> str:
    """Which weights: a stamp on ComfyUI's module (a new load is a new module) + the patcher's LoRA patches."""
    _, module = find_llm(clip)
    stamp = getattr(module, _IDENTITY_ATTR, None)
    if stamp is None:
        stamp = uuid.uuid4().hex
        setattr(module, _IDENTITY_ATTR, stamp)
    return f"{stamp}|patches {clip.patcher.patches_uuid}"


def handle_from_clip(clip, name: Optional[str], identity: str, memory_mode: str = "auto") -> LLMHandle:
    """An LLMDIFF_LLM whose weights stay under the CLIP's own ModelPatcher (LoRA patches on it included)."""
    llm = comfy_llm(clip, name)
    return LLMHandle(loaded=llm, patcher=clip.patcher, name=llm.info.name, identity=f"comfyui|{identity}|{llm.dtype}",
                     memory_mode=memory_mode, backend="comfyui", partial_load=True)
