"""A test-only ComfyUI node, LLMDiffProbe, installed into the e2e SD1.5 server's custom_nodes (conftest.py).

It sits between the UNet loader and the sampler: it saves the positive and negative CONDITIONING it
is given, and patches the UNet's cross-attention (attn2) to save the first context that reaches it,
so test_unet_cross_attention_receives_our_context can compare them tensor for tensor. Only ComfyUI
imports this file (pytest does not collect it: its name does not start with test_).
"""
import os

import folder_paths
from safetensors.torch import save_file


class LLMDiffProbe:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "positive": ("CONDITIONING",), "negative": ("CONDITIONING",)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "probe"
    CATEGORY = "testing"

    def probe(self, model, positive, negative):
        out_dir = os.path.join(folder_paths.get_output_directory(), "probe")
        os.makedirs(out_dir, exist_ok=True)
        save_file({"positive": positive[0][0].contiguous(), "negative": negative[0][0].contiguous()},
                  os.path.join(out_dir, "conditioning.safetensors"))
        patched = model.clone()
        seen = []

        def record(q, context, value, extra_options):
            if not seen:  # the first UNet call of the first step is enough: every call gets the same context
                seen.append(True)
                save_file({"context": context.detach().float().cpu().contiguous()}, os.path.join(out_dir, "attn2_context.safetensors"))
            return q, context, value

        patched.set_model_attn2_patch(record)
        return (patched,)


NODE_CLASS_MAPPINGS = {"LLMDiffProbe": LLMDiffProbe}
