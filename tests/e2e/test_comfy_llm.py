"""End to end: a full-size LLM text-encoder file through ComfyUI's own CLIPLoader, and through Load LLM.

ComfyUI recognises single-file LLMs by weight names and builds them with fixed full-size configs, so this
uses a random file of Qwen2.5-3B's shape (support/full_llm.py: bf16, 6.2 GB, the smallest LLM ComfyUI
detects; ComfyUI ships its tokenizer) and an adapter made for it by the real `python -m adapter init`.

    CLIPLoader(file) -> LLM from CLIP loader -> LLM Diff Text Encode -> conditioning     (graph "from_clip")
    Load LLM("text_encoders/<file>")         -> LLM Diff Text Encode -> conditioning     (graph "from_file")

Both must run, give a finite [1, 77, 768] SD1.5 context, and agree (the same ComfyUI implementation over
the same weights). The server is this file's own (--cache-none, nothing else loaded: the other e2e servers
are stopped first, and it runs after them), and the test skips, naming the numbers, when the machine has
less than MIN_FREE_GIB available. Parity with the transformers path is tested per family on tiny models
(tests/unit/test_comfy_llm_parity.py); the memory and speed of both paths at this size are in
bench/comfy_llm_paths.py.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from devkit.comfyui import ComfyServer

# The server holds the bf16 weights (6.2 GB) and, while CLIPLoader runs, the file's tensors beside them:
# measured peak RSS 12.4 GB (printed at the end of the session as "qwen25_3b"), about 5 minutes on 2 cores.
MIN_FREE_GIB = 15
FILE_LINK = "qwen25_3b_random.safetensors"
ADAPTER = "qwen25-3b-sd15.safetensors"
PROMPT = "a red fox sitting in the snow, golden hour, detailed photograph"


@pytest.fixture(scope="module")
def comfy_qwen25_3b(_servers, e2e_tools, tmp_path_factory):
    _servers.stop_all()  # run alone: this server needs most of the machine's memory
    free = e2e_tools.mem_available_gib()
    if free < MIN_FREE_GIB:
        pytest.skip(f"the Qwen2.5-3B server needs ~{MIN_FREE_GIB} GiB of available RAM (6.2 GB of bf16 weights, "
                    f"held twice while the file loads); this machine has {free:.1f} GiB available now")
    from devkit.full_llm import build_qwen25_3b

    with e2e_tools.timed("qwen25_3b random weights (cached after the first build)"):
        weights = build_qwen25_3b()
    adapter = tmp_path_factory.mktemp("qwen25_3b") / ADAPTER
    e2e_tools.adapter_init(weights.folder, "sd15", adapter)
    with e2e_tools.timed("qwen25_3b server start"):
        server = ComfyServer("e2e-qwen25-3b", cache_none=True)
        (server.base_dir / "custom_nodes" / "llmdiff_save_conditioning.py").symlink_to(
            Path(__file__).with_name("save_conditioning_node.py"))
        server.link_model("text_encoders", weights.file, FILE_LINK)
        server.link_model("llm_adapters", adapter, ADAPTER)
        server.start()
    yield server
    server.stop()
    e2e_tools.peaks["qwen25_3b"] = server.peak_rss_mb()


def graph(llm_nodes: dict, name: str) -> dict:
    """llm_nodes (ending in node "llm") -> LLM Diff Text Encode -> save the conditioning and show the info."""
    return {
        **llm_nodes,
        "adapter": {"class_type": "LLMDiffLoadAdapter", "inputs": {"adapter_name": ADAPTER}},
        "encode": {"class_type": "LLMDiffTextEncode", "inputs": {"llm": ["llm", 0], "adapter": ["adapter", 0], "text": PROMPT}},
        "save": {"class_type": "LLMDiffSaveConditioning", "inputs": {"conditioning": ["encode", 0], "name": name}},
        "show": {"class_type": "PreviewAny", "inputs": {"source": ["encode", 1]}},
    }


def run(server: ComfyServer, api: dict, name: str, timings: dict):
    start = time.monotonic()
    result = server.run(api, timeout=1200)
    timings[f"qwen25_3b graph {name}"] = round(time.monotonic() - start, 1)
    assert result.ok, result.error_text + "\n" + server.log_tail()
    context = load_file(server.output_dir / "conditioning" / f"{name}.safetensors")["context"]
    return context, "".join(result.outputs["show"]["text"])


def test_single_file_llm_through_cliploader_and_load_llm(comfy_qwen25_3b, e2e_tools):
    server = comfy_qwen25_3b
    info = server.object_info()
    assert f"text_encoders/{FILE_LINK}" in info["LLMDiffLoadLLM"]["input"]["required"]["llm_name"][1]["options"]
    from_clip = {
        "clip": {"class_type": "CLIPLoader", "inputs": {"clip_name": FILE_LINK, "type": "omnigen2"}},
        "llm": {"class_type": "LLMDiffLLMFromCLIP", "inputs": {"clip": ["clip", 0]}},
    }
    context, text = run(server, graph(from_clip, "from_clip"), "from_clip", e2e_tools.timings)
    assert context.shape == (1, 77, 768) and torch.isfinite(context).all()
    assert "Qwen25_3B from CLIPLoader" in text
    server.free()  # the next graph loads the file again: do not hold two copies
    from_file = {"llm": {"class_type": "LLMDiffLoadLLM", "inputs": {"llm_name": f"text_encoders/{FILE_LINK}", "dtype": "auto"}}}
    again, text = run(server, graph(from_file, "from_file"), "from_file", e2e_tools.timings)
    assert f"text_encoders/{FILE_LINK}" in text
    torch.testing.assert_close(again, context)  # one implementation, one set of weights
    assert "clip missing" not in server.log_text()  # every weight of the file reached ComfyUI's model
