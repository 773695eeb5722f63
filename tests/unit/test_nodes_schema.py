"""The node schemas are the public contract of every saved workflow: ids, input names and order."""
import pytest

from devkit.comfy_pack import node_classes, pack_module

# ComfyUI stores widget values by position: this order may only ever grow at the end.
CONTRACT = {
    "LLMDiffLoadLLM": ("Load LLM (decoder-only)", ["llm_name", "dtype"], ["memory_mode", "quantization"], ["LLMDIFF_LLM"]),
    "LLMDiffLoadAdapter": ("Load LLM Diff Adapter", ["adapter_name"], [], ["LLMDIFF_ADAPTER", "STRING"]),
    "LLMDiffTextEncode": (
        "LLM Diff Text Encode",
        ["llm", "adapter", "text"],
        ["clip", "clip_mode", "llm_strength", "clip_strength", "pooled_blend",
         "width", "height", "crop_w", "crop_h", "target_width", "target_height",
         "system_prompt", "skip_first", "t5_padding"],
        ["CONDITIONING", "STRING"],
    ),
    "LLMDiffApplyAdapter": ("Apply LLM Diff Adapter (timestep-aware)", ["model", "adapter"], [], ["MODEL"]),
    "LLMDiffEnhancePrompt": ("Enhance prompt with LLM", ["llm", "text", "instruction", "seed", "max_new_tokens"],
                             ["temperature", "top_p"], ["STRING"]),
    "LLMDiffLLMFromCLIP": ("LLM from CLIP loader", ["clip"], ["memory_mode"], ["LLMDIFF_LLM"]),
}


@pytest.fixture(scope="module")
def infos():
    """What GET /object_info serves for each node (ComfyUI builds it from the V3 schema this way)."""
    return {node_id: cls.GET_SCHEMA().get_v1_info(cls) for node_id, cls in node_classes().items()}


@pytest.mark.parametrize("node_id", sorted(CONTRACT))
def test_ids_names_order_and_outputs(infos, node_id):
    display, required, optional, outputs = CONTRACT[node_id]
    info = infos[node_id]
    assert info.display_name == display
    assert list(info.input["required"]) == required
    assert list(info.input.get("optional", {})) == optional
    assert list(info.output) == outputs


@pytest.mark.parametrize("node_id", sorted(CONTRACT))
def test_every_input_has_a_tooltip(infos, node_id):
    inputs = {**infos[node_id].input["required"], **infos[node_id].input.get("optional", {})}
    missing = [name for name, (_type, options) in inputs.items() if not options.get("tooltip")]
    assert not missing


def test_rare_knobs_are_advanced_and_options_fixed(infos):
    encode = infos["LLMDiffTextEncode"].input
    advanced = {name for name, (_t, opts) in encode["optional"].items() if opts.get("advanced")}
    assert advanced == {"pooled_blend", "width", "height", "crop_w", "crop_h", "target_width", "target_height",
                        "system_prompt", "skip_first", "t5_padding"}
    assert encode["optional"]["t5_padding"][1]["options"] == ["max_length", "flexible"]
    assert encode["optional"]["clip_mode"][1]["options"] == ["none", "concat"]
    assert encode["required"]["text"][1]["multiline"] is True
    assert infos["LLMDiffLoadLLM"].input["required"]["dtype"][1]["options"] == ["auto", "bf16", "fp16", "fp32"]
    load_llm = infos["LLMDiffLoadLLM"].input["optional"]
    assert {name for name, (_t, opts) in load_llm.items() if opts.get("advanced")} == {"memory_mode", "quantization"}
    assert load_llm["memory_mode"][1]["options"] == ["auto", "keep_loaded", "unload_after"]
    assert load_llm["quantization"][1]["options"] == ["none", "8bit", "4bit"]
    # the node's copy (the schema may not import adapter/) of the values the loader accepts
    assert tuple(load_llm["quantization"][1]["options"]) == pack_module("adapter.quantization").QUANTIZATIONS
    enhance = infos["LLMDiffEnhancePrompt"].input
    assert {name for name, (_t, opts) in enhance["optional"].items() if opts.get("advanced")} == {"temperature", "top_p"}
    assert enhance["required"]["seed"][1]["control_after_generate"] is True
