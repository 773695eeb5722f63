"""The in-process pack loader (devkit.comfy_pack) exposes exactly the V3 entry point and the six nodes."""
from devkit.comfy_pack import load_pack, node_classes


def test_pack_exports_only_the_v3_entry_point():
    pack = load_pack()
    assert callable(pack.comfy_entrypoint)
    # A non-None NODE_CLASS_MAPPINGS would make ComfyUI ignore comfy_entrypoint.
    assert getattr(pack, "NODE_CLASS_MAPPINGS", None) is None
    assert set(node_classes()) == {"LLMDiffLoadLLM", "LLMDiffLoadAdapter", "LLMDiffTextEncode", "LLMDiffApplyAdapter",
                                 "LLMDiffEnhancePrompt", "LLMDiffLLMFromCLIP"}
