"""The objects that travel on the LLMDIFF_LLM and LLMDIFF_ADAPTER wires, each held in a ModelPatcher.

A ModelPatcher is how ComfyUI accounts for memory: `load_models_gpu` moves a model to its load
device when it is needed and offloads it again when the UNet (or anything else) wants the space.
Both handles are made on the offload device and loaded only when the text encode node runs.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

import comfy.model_management as mm
import comfy.model_patcher

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class ModuleHolder(torch.nn.Module):
    """A plain container around a module we hand to ModelPatcher.

    ModelPatcher records the model's current device by assigning `model.device`; transformers'
    models expose `device` as a read-only property, so the assignment would raise. Holding the
    model one level down keeps ComfyUI's bookkeeping on an object that accepts it.
    """

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner


def make_patcher(module: torch.nn.Module, load_device=None, offload_device=None) -> comfy.model_patcher.ModelPatcher:
    """Wrap `module` so ComfyUI can load it on the text-encoder device and offload it under pressure
    (other devices only where the weights cannot move: a bitsandbytes-quantised LLM)."""
    holder = ModuleHolder(module)
    return comfy.model_patcher.ModelPatcher(
        holder, load_device=load_device or mm.text_encoder_device(),
        offload_device=offload_device or mm.text_encoder_offload_device(),
    )


def choose_llm_dtype(choice: str, device: torch.device) -> torch.dtype:
    """The LLM's dtype for the `dtype` widget.

    `auto`: fp32 on a CPU; on an accelerator, ComfyUI's own text-encoder choice (its
    --fp16-text-enc / --bf16-text-enc / --fp32-text-enc flags included). An fp8 choice cannot
    run a transformers model directly, so it becomes fp16 (or bf16 where fp16 is unsupported).
    fp16 on a CPU fails inside many kernels, so it is replaced by fp32 with a warning.
    """
    if choice not in ("auto", *DTYPES):
        raise ValueError(f"dtype must be one of auto, bf16, fp16, fp32; got {choice!r}")
    on_cpu = mm.is_device_cpu(device)
    if choice == "auto":
        if on_cpu:
            return torch.float32
        dtype = mm.text_encoder_dtype(device)
        if dtype not in DTYPES.values():
            dtype = torch.float16 if mm.should_use_fp16(device) else torch.bfloat16
        return dtype
    dtype = DTYPES[choice]
    if on_cpu and dtype == torch.float16:
        log.warning("fp16 does not run on a CPU; loading the LLM in fp32 instead (pick bf16 to halve its memory).")
        return torch.float32
    return dtype


def load_llm_folder(path: str, name: str, dtype: str, memory_mode: str = "auto", quantization: str = "none") -> "LLMHandle":
    """An LLMDIFF_LLM handle for a Hugging Face folder (transformers), on the offload device until an encode needs it;
    8/4-bit weights are quantised onto the GPU while loading and never moved."""
    import comfy.utils

    from ..adapter import load_llm

    device = mm.text_encoder_device()
    if quantization != "none" and not mm.is_device_cuda(device):
        device = mm.get_torch_device()  # ComfyUI may keep text encoders on the CPU (--lowvram); bitsandbytes needs the GPU
    torch_dtype = choose_llm_dtype(dtype, device)
    progress = comfy.utils.ProgressBar(2)
    log.info("Loading LLM %s from %s (%s, quantization %s)", name, path, torch_dtype, quantization)
    if quantization == "none":  # on the offload device; the encode node asks ComfyUI to move it when it runs
        loaded = load_llm(path, dtype=torch_dtype, device=mm.text_encoder_offload_device())
        patcher = make_patcher(loaded.model)
    else:  # bitsandbytes quantises while loading onto the GPU; we never move those weights (load = offload device)
        loaded = load_llm(path, dtype=torch_dtype, device=device, quantization=quantization)
        patcher = make_patcher(loaded.model, load_device=device, offload_device=device)
    progress.update(1)
    mm.throw_exception_if_processing_interrupted()
    handle = LLMHandle(loaded=loaded, patcher=patcher, name=name, identity=f"{folder_identity(path)}|{torch_dtype}|{quantization}",
                       memory_mode=memory_mode)
    progress.update(1)
    return handle


def file_identity(path: str) -> str:
    """Path + size + modification time: changes whenever the file is replaced, cheap to compute."""
    stat = os.stat(path)
    return f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}"


def folder_identity(path: str) -> str:
    """Folder + name, size and modification time of every file in it (a Hugging Face folder is flat; symlinks, as in
    a hub cache snapshot, are followed): changes when any shard, the config or the tokenizer is replaced."""
    entries = []
    with os.scandir(path) as items:
        for item in items:
            try:
                if item.is_file():
                    stat = item.stat()
                    entries.append(f"{item.name}:{stat.st_size}:{stat.st_mtime_ns}")
            except OSError:  # a dangling link: no weights there, loading names it
                entries.append(f"{item.name}:missing")
    return f"{os.path.abspath(path)}|" + "|".join(sorted(entries))


@dataclass
class LLMHandle:
    """What LLMDIFF_LLM carries: the loaded LLM (adapter.LoadedLLM), its patcher and identity."""

    loaded: Any  # adapter.LoadedLLM: .model, .tokenizer, .info (LLMInfo), .device, .dtype
    patcher: comfy.model_patcher.ModelPatcher
    name: str  # folder name as picked in the node
    identity: str  # folder identity (every file's size and mtime) + dtype: the encode cache's key for "which LLM"
    memory_mode: str = "auto"  # nodes.memory.MEMORY_MODES: what happens to the weights after each run
    backend: str = "transformers"  # "transformers" (adapter.LoadedLLM) or "comfyui" (nodes.comfy_llm.ComfyLLM)
    partial_load: bool = False  # True when ComfyUI may leave part of the weights offloaded (comfy.ops layers)

    @property
    def info(self):
        return self.loaded.info


@dataclass
class AdapterHandle:
    """What LLMDIFF_ADAPTER carries: the adapter module (with .config), its patcher and identity."""

    module: torch.nn.Module  # adapter.LLMDiffAdapter
    patcher: comfy.model_patcher.ModelPatcher
    name: str
    identity: str  # file identity: covers the template too, which lives in the file

    @property
    def config(self):
        return self.module.config
