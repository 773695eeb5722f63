"""8/4-bit loading (bitsandbytes, optional, CUDA only): the config built and every way it is refused.

bitsandbytes is not installed here and has no CPU use, so the tests check the BitsAndBytesConfig
handed to transformers (with bitsandbytes reported present) and the errors; loading quantised
weights needs a CUDA machine with bitsandbytes.
"""
from __future__ import annotations

import pytest
import torch

from adapter import LLMLoadError, load_llm
from adapter import quantization as quant
from devkit.tiny_models import make_tiny_llm

CUDA = torch.device("cuda")


@pytest.fixture
def bitsandbytes_present(monkeypatch):
    monkeypatch.setattr(quant, "_installed", lambda package: package in ("bitsandbytes", "accelerate"))


def test_none_builds_no_config():
    assert quant.bitsandbytes_config("none", "cpu", torch.float32) is None


def test_4bit_is_nf4_with_double_quantisation_computing_in_the_chosen_dtype(bitsandbytes_present):
    config = quant.bitsandbytes_config("4bit", CUDA, torch.bfloat16)
    assert config.load_in_4bit and not config.load_in_8bit
    assert (config.bnb_4bit_quant_type, config.bnb_4bit_use_double_quant, config.bnb_4bit_compute_dtype) == ("nf4", True, torch.bfloat16)


def test_8bit_is_llm_int8(bitsandbytes_present):
    config = quant.bitsandbytes_config("8bit", "cuda:1", torch.float16)
    assert config.load_in_8bit and not config.load_in_4bit


@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_refused_off_cuda(bitsandbytes_present, mode):
    with pytest.raises(LLMLoadError, match=f"{mode} loading uses bitsandbytes, which needs an NVIDIA GPU \\(CUDA\\), but the LLM would run on cpu.*'none'"):
        quant.bitsandbytes_config(mode, "cpu", torch.float32)


def test_missing_packages_say_what_to_install(monkeypatch):
    monkeypatch.setattr(quant, "_installed", lambda package: False)
    with pytest.raises(LLMLoadError, match="needs the optional packages bitsandbytes and accelerate: run `pip install bitsandbytes accelerate`"):
        quant.bitsandbytes_config("4bit", CUDA, torch.bfloat16)
    monkeypatch.setattr(quant, "_installed", lambda package: package == "accelerate")
    with pytest.raises(LLMLoadError, match="needs the optional package bitsandbytes: run `pip install bitsandbytes`"):
        quant.bitsandbytes_config("8bit", CUDA, torch.float16)


def test_package_detection_finds_what_is_installed_and_only_that():
    assert quant._installed("torch") and not quant._installed("no_such_package_llm_diff")


@pytest.mark.skipif(quant._installed("bitsandbytes"), reason="bitsandbytes is installed on this machine; the refusal "
                                                              "without it is also checked with it reported absent")
def test_without_bitsandbytes_a_cuda_request_is_refused_with_the_install_hint():
    with pytest.raises(LLMLoadError, match="pip install bitsandbytes"):
        quant.bitsandbytes_config("4bit", CUDA, torch.bfloat16)


def test_unknown_mode_lists_the_choices():
    with pytest.raises(LLMLoadError, match="none, 8bit, 4bit"):
        quant.bitsandbytes_config("2bit", CUDA, torch.float16)


def test_load_llm_refuses_on_the_cpu_before_reading_weights(tmp_path):
    with pytest.raises(LLMLoadError, match="needs an NVIDIA GPU"):
        load_llm(tmp_path / "does-not-exist", quantization="4bit")  # the device check comes first


def test_load_llm_hands_the_config_and_the_device_to_transformers(bitsandbytes_present, monkeypatch):
    import transformers

    seen = {}

    def fake_from_pretrained(path, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop before touching CUDA")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", fake_from_pretrained)
    with pytest.raises(LLMLoadError, match="stop before touching CUDA"):
        load_llm(make_tiny_llm(family="qwen2"), dtype=torch.bfloat16, device="cuda:0", quantization="4bit")
    assert seen["device_map"] == {"": torch.device("cuda:0")}
    assert seen["quantization_config"].load_in_4bit and seen["dtype"] == torch.bfloat16


def test_the_loader_node_refuses_quantisation_without_cuda(tmp_path):
    from devkit.comfy_pack import load_pack, node_classes, pack_module

    load_pack()
    import folder_paths

    (tmp_path / "tiny-qwen2").symlink_to(make_tiny_llm(family="qwen2"))
    saved = folder_paths.folder_names_and_paths.get("LLM")
    folder_paths.folder_names_and_paths["LLM"] = ([str(tmp_path)], {"folder"})
    try:
        with pytest.raises(pack_module("adapter").LLMLoadError, match="8bit loading uses bitsandbytes, which needs an NVIDIA GPU"):
            node_classes()["LLMDiffLoadLLM"].execute("tiny-qwen2", "auto", quantization="8bit")
    finally:
        if saved is None:
            folder_paths.folder_names_and_paths.pop("LLM", None)
        else:
            folder_paths.folder_names_and_paths["LLM"] = saved
