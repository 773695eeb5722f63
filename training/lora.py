"""Optional UNet LoRA (peft through diffusers' adapter API) and its export for ComfyUI's LoRA loader.

The export uses the kohya layout, which ComfyUI maps for every UNet it knows:
    lora_unet_<diffusers module path, dots as underscores>.lora_down.weight   (peft's lora_A)
    lora_unet_<...>.lora_up.weight                                            (peft's lora_B)
    lora_unet_<...>.alpha                                                     (a scalar: the scale is alpha / rank)
`comfy.lora.model_lora_keys_unet` builds these names from the diffusers key map of the model, so a
LoRA trained on a diffusers UNet applies to the same UNet loaded by ComfyUI from any file layout.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
from safetensors.torch import save_file

log = logging.getLogger(__name__)


def add_unet_lora(unet, rank: int, alpha: float, target_modules: list[str]) -> list[torch.nn.Parameter]:
    """Inject a LoRA into the (frozen) UNet; returns its trainable parameters, kept in fp32."""
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), init_lora_weights="gaussian"))
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    if not params:
        raise ValueError(f"lora.target_modules {target_modules} matched no module of the UNet")
    for p in params:
        p.data = p.data.float()  # LoRA weights train in fp32 even when the frozen UNet is fp16/bf16
        p.requires_grad_(True)
    return params


def has_lora(unet) -> bool:
    return bool(getattr(unet, "_hf_peft_config_loaded", False))


@contextmanager
def lora_disabled(unet):
    """Run the UNet as the original base model (the teacher), then switch the LoRA back on."""
    if not has_lora(unet):
        yield
        return
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


def comfy_lora_state_dict(unet, alpha: float) -> dict[str, torch.Tensor]:
    """The LoRA weights in the kohya key layout ComfyUI's loader accepts."""
    out: dict[str, torch.Tensor] = {}
    for name, param in unet.named_parameters():
        for peft_part, kohya_part in ((".lora_A.", "lora_down"), (".lora_B.", "lora_up")):
            if peft_part in name:
                module, _ = name.split(peft_part)
                base = "lora_unet_" + module.replace(".", "_")
                out[f"{base}.{kohya_part}.weight"] = param.detach().to("cpu", torch.float32).contiguous()
                out[f"{base}.alpha"] = torch.tensor(float(alpha))
    return out


def export_comfy_lora(unet, alpha: float, path, metadata: dict[str, str]) -> None:
    tensors = comfy_lora_state_dict(unet, alpha)
    save_file(tensors, str(path), metadata=metadata)
    log.info("UNet LoRA exported for ComfyUI's LoraLoader: %s (%d modules)", path, len(tensors) // 3)
