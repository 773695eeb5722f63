"""Load a trainer-exported UNet LoRA with ComfyUI's own LoRA code (run as a script by test_train_families.py).

usage: python comfy_lora_check.py <comfyui dir> <diffusers unet folder> <lora.safetensors>

Builds ComfyUI's UNetModel with the tiny diffusers UNet's structure, loads the diffusers weights into it
through ComfyUI's key map (proving the structure matches), then maps the LoRA with
comfy.lora.model_lora_keys_unet + comfy.lora.load_lora and prints a JSON report, including every
"lora key not loaded" warning ComfyUI logs and the merged weight of one module, for comparison.
"""
import json
import logging
import sys
from pathlib import Path

comfy_dir, unet_dir, lora_path = sys.argv[1:4]
sys.path.insert(0, comfy_dir)

import importlib.machinery  # noqa: E402
import types  # noqa: E402

import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True  # before comfy.model_management is imported: it probes CUDA at import
# comfy.model_base imports torchvision at module level (Cosmos/Cascade only); PyPI's torchvision wheel
# cannot load beside the CPU torch here, so an empty stand-in answers (as devkit/comfy_pack.py does).
_stub = types.ModuleType("torchvision")
_stub.__spec__ = importlib.machinery.ModuleSpec("torchvision", None, is_package=True)
_stub.__path__ = []
_stub.transforms = types.ModuleType("torchvision.transforms")
sys.modules.setdefault("torchvision", _stub)
sys.modules.setdefault("torchvision.transforms", _stub.transforms)

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import comfy.lora  # noqa: E402
import comfy.supported_models  # noqa: E402
import comfy.utils  # noqa: E402

config = json.loads((Path(unet_dir) / "config.json").read_text())
levels = len(config["block_out_channels"])
per_level = config["transformer_layers_per_block"]
per_level = per_level if isinstance(per_level, list) else [per_level] * levels
has_attn = ["CrossAttn" in t for t in config["down_block_types"]]
res = config["layers_per_block"]
unet_config = {
    "use_checkpoint": False, "image_size": 32, "out_channels": config["out_channels"], "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "in_channels": config["in_channels"],
    "model_channels": config["block_out_channels"][0], "num_res_blocks": [res] * levels,
    "transformer_depth": sum(([per_level[i] if has_attn[i] else 0] * res for i in range(levels)), []),
    "channel_mult": [c // config["block_out_channels"][0] for c in config["block_out_channels"]],
    "transformer_depth_middle": per_level[-1], "use_linear_in_transformer": config["use_linear_projection"],
    "context_dim": config["cross_attention_dim"],
    "transformer_depth_output": sum(([per_level[i] if has_attn[i] else 0] * (res + 1) for i in range(levels)), []),
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
model_config = comfy.supported_models.SD15(unet_config)
model_config.unet_config.update({"num_heads": 4, "num_head_channels": -1})
model = model_config.get_model({}, device="cpu")

diffusers_sd = load_file(str(Path(unet_dir) / "diffusion_pytorch_model.safetensors"))
mapping = comfy.utils.unet_to_diffusers(model_config.unet_config)
comfy_sd = {comfy_key: diffusers_sd[diff_key] for diff_key, comfy_key in mapping.items() if diff_key in diffusers_sd}
missing, unexpected = model.diffusion_model.load_state_dict(comfy_sd, strict=False)

warnings = []


class Grab(logging.Handler):
    def emit(self, record):
        warnings.append(record.getMessage())


logging.getLogger().addHandler(Grab(level=logging.WARNING))
lora = load_file(lora_path)
key_map = comfy.lora.model_lora_keys_unet(model, {})
patches = comfy.lora.load_lora(lora, key_map)

# ComfyUI's merge of one LoRA module: W + alpha / rank * up @ down
target = sorted(patches)[0]
patch = patches[target]
up, down, alpha = patch.weights[0], patch.weights[1], patch.weights[2]
delta = (alpha / down.shape[0]) * (up.flatten(1) @ down.flatten(1))
diff_name = next(d for d, c in mapping.items() if f"diffusion_model.{c}" == target)
print(json.dumps({
    "missing": list(missing), "unexpected": list(unexpected), "lora_tensors": len(lora), "patched": len(patches),
    "not_loaded": [w for w in warnings if "lora key not loaded" in w], "target": target,
    "diffusers_module": diff_name[: -len(".weight")], "delta": delta.reshape(-1)[:8].tolist(),
}))
