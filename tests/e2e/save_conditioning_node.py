"""A test-only ComfyUI output node, LLMDiffSaveConditioning, installed into the e2e LLM server (test_comfy_llm.py).

It writes the first entry's context (and pooled vector, if any) of a CONDITIONING to
output/conditioning/<name>.safetensors, so a test can compare what two graphs produced tensor for
tensor. Only ComfyUI imports this file (pytest does not collect it: its name does not start with test_).
"""
import os

import folder_paths
from safetensors.torch import save_file


class LLMDiffSaveConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("CONDITIONING",), "name": ("STRING", {"default": "cond"})}}

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def save(self, conditioning, name):
        out_dir = os.path.join(folder_paths.get_output_directory(), "conditioning")
        os.makedirs(out_dir, exist_ok=True)
        context, extras = conditioning[0]
        tensors = {"context": context.detach().float().cpu().contiguous()}
        if extras.get("pooled_output") is not None:
            tensors["pooled"] = extras["pooled_output"].detach().float().cpu().contiguous()
        save_file(tensors, os.path.join(out_dir, f"{name}.safetensors"))
        return {}


NODE_CLASS_MAPPINGS = {"LLMDiffSaveConditioning": LLMDiffSaveConditioning}
