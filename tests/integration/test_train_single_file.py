"""A single-file base model (the checkpoint a ComfyUI user has) loads offline with a local config folder,
trains, and fails with what to provide when no config can be had offline."""
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from adapter import read_adapter_config
from devkit.cache import cache_dir, vendored_comfyui_source
from devkit.train_runs import run_train, tiny_dataset, train_command
from devkit.tiny_pipelines import TINY_VERSION, tiny_pipeline
from training.models import BaseModelError, load_base_model

pytestmark = pytest.mark.slow

# ComfyUI's description of the tiny SD1.5-like UNet (devkit/tiny_pipelines.py) for its key map:
# two levels, one res block each, a transformer only at the second level and in the middle.
TINY_UNET_LDM = dict(num_res_blocks=[1, 1], channel_mult=[1, 2], transformer_depth=[0, 1],
                     transformer_depth_output=[0, 0, 1, 1], transformer_depth_middle=1)


def _to_original_layout(folder: Path) -> dict[str, torch.Tensor]:
    """The tiny diffusers pipeline in the original (LDM) single-file key layout, converted with ComfyUI's own maps."""
    source = str(vendored_comfyui_source())
    if source not in sys.path:
        sys.path.insert(0, source)
    import comfy.diffusers_convert
    import comfy.utils
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    unet_map = comfy.utils.unet_to_diffusers(TINY_UNET_LDM)  # diffusers key -> LDM key
    unet = pipe.unet.state_dict()
    assert set(unet) <= set(unet_map), sorted(set(unet) - set(unet_map))[:5]
    sd = {f"model.diffusion_model.{unet_map[k]}": v for k, v in unet.items()}
    # ComfyUI's VAE map assumes SD's four levels (decoder up.3 is the first up block); this VAE has two
    levels = len(pipe.vae.config.block_out_channels)
    vae = comfy.diffusers_convert.convert_vae_state_dict(pipe.vae.state_dict())
    vae = {re.sub(r"^decoder\.up\.(\d)\.", lambda m: f"decoder.up.{int(m.group(1)) - (4 - levels)}.", k): v for k, v in vae.items()}
    sd.update({f"first_stage_model.{k}": v for k, v in vae.items()})
    # SD1.5 keeps transformers' CLIPTextModel keys under cond_stage_model.transformer.text_model.
    # (transformers 5 dropped the text_model. prefix from the state dict; put it back)
    for k, v in pipe.text_encoder.state_dict().items():
        sd[f"cond_stage_model.transformer.{k if k.startswith('text_model.') else 'text_model.' + k}"] = v
    return {k: v.contiguous() for k, v in sd.items()}


@pytest.fixture(scope="module")
def single_file() -> Path:
    """tiny_pipeline("sd15") as one .safetensors checkpoint in the original SD layout; built once per machine."""
    final = cache_dir() / "tiny_pipelines" / f"sd15-single-v{TINY_VERSION}.safetensors"
    if not final.is_file():
        handle, tmp = tempfile.mkstemp(suffix=".tmp", dir=final.parent)
        os.close(handle)
        save_file(_to_original_layout(tiny_pipeline("sd15")), tmp)
        os.replace(tmp, final)
    return final


@pytest.fixture(scope="module")
def config_folder(tmp_path_factory) -> Path:
    """The tiny pipeline's diffusers folder without any weight file: configs and tokenizer only, so every
    weight a test sees must have come from the single file."""
    folder = tmp_path_factory.mktemp("configs") / "sd15-configs"
    shutil.copytree(tiny_pipeline("sd15"), folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return folder


def test_single_file_loads_offline_with_a_local_config_folder(single_file, config_folder):
    folder = tiny_pipeline("sd15")
    from_file = load_base_model(str(single_file), str(config_folder))
    from_folder = load_base_model(str(folder))
    assert from_file.family == "sd15" and from_file.name == single_file.name
    assert from_file.prediction_type == "epsilon" and from_file.context_dim == 32
    for part in ("unet", "vae"):
        a, b = getattr(from_file, part).state_dict(), getattr(from_folder, part).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{part} weights differ from the diffusers folder"
    a, b = from_file.text_encoders[0].state_dict(), from_folder.text_encoders[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the teacher's conditioning is the same through either loading path
    ctx_file, _ = from_file.encode_clip(["a red square"], "cpu")
    ctx_folder, _ = from_folder.encode_clip(["a red square"], "cpu")
    assert torch.equal(ctx_file, ctx_folder)


def test_trainer_runs_on_a_single_file_checkpoint(single_file, config_folder, tmp_path):
    data = tiny_dataset(tmp_path / "data", count=2)
    args = train_command("sd15", data, tmp_path / "out", 1, "--set", f"data.latent_cache_dir={tmp_path / 'latents'}")
    args[args.index("--base-model") + 1] = str(single_file)
    proc = run_train([*args, "--base-model-config", str(config_folder)])
    assert proc.returncode == 0, proc.output
    config = read_adapter_config(tmp_path / "out/adapter.safetensors")
    assert config.training["base_model"] == single_file.name and config.target.family == "sd15"


def test_single_file_without_offline_configs_says_what_to_provide(single_file, tmp_path):
    # nothing given and no ComfyUI around: refused before diffusers could try the network
    with pytest.raises(BaseModelError) as err:
        load_base_model(str(single_file))
    assert "sd15" in str(err.value) and "--base-model-config" in str(err.value)

    # ComfyUI's v1 YAML describes a full-size UNet and VAE, and the CLIP configs are not in the HF cache here
    yaml = vendored_comfyui_source() / "models" / "configs" / "v1-inference.yaml"
    with pytest.raises(BaseModelError) as err:
        load_base_model(str(single_file), str(yaml))
    assert "v1-inference.yaml" in str(err.value) and "--base-model-config" in str(err.value)

    with pytest.raises(BaseModelError, match="does not exist"):
        load_base_model(str(single_file), str(tmp_path / "missing.yaml"))

    other = tmp_path / "not_a_checkpoint.safetensors"
    save_file({"proj_in.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(BaseModelError, match="not a single-file Stable Diffusion checkpoint"):
        load_base_model(str(other), str(tiny_pipeline("sd15")))
