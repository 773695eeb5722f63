"""A test-only ComfyUI node, LLMDiffProbe, installed into the e2e SD1.5 server's custom_nodes (conftest.py).

It sits between the UNet loader (or a model patching node) and the sampler: it saves the positive and
negative CONDITIONING it is given, and patches the UNet's cross-attention (attn2) to save the first
context that reaches it, so test_unet_cross_attention_receives_our_context can compare them tensor for
tensor. Only ComfyUI imports this file (pytest does not collect it: its name does not start with test_).

With `trace` on it also records every model call, into probe/trace/ (emptied first):
- unet_NNN.safetensors: the context the UNet was called with (`context`, before ComfyUI casts it to the
  UNet's dtype), the call's sigmas (`sigma`) and model timesteps (`timestep`); its metadata holds the
  batch's cond/uncond order (`chunks`) and what LLMDiffApplyAdapter's wrapper reported for the call
  (`llmdiff_step`, JSON, "null" when no wrapper ran);
- control_NNN.safetensors: the context and timesteps every ControlNet found in the conditioning was
  given (its get_control), so a test can check ControlNet and the UNet saw the same context.
"""
import json
import os
import shutil

import folder_paths
import comfy.patcher_extension
from safetensors.torch import save_file

RECORD_KEY = "llmdiff_step"  # nodes/timestep_aware/wrapper.py RECORD_KEY (the pack is not importable by name here)


class LLMDiffProbe:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "positive": ("CONDITIONING",), "negative": ("CONDITIONING",)},
                "optional": {"trace": ("BOOLEAN", {"default": False})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "probe"
    CATEGORY = "testing"

    def probe(self, model, positive, negative, trace=False):
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
        if trace:
            trace_dir = os.path.join(out_dir, "trace")
            shutil.rmtree(trace_dir, ignore_errors=True)
            os.makedirs(trace_dir)
            patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "llmdiff_probe", _unet_recorder(trace_dir))
            for entry in positive + negative:
                if entry[1].get("control") is not None:
                    _record_control(entry[1]["control"], trace_dir)
        return (patched,)


def _save(path, tensors, metadata=None):
    save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, path, metadata=metadata)


def _unet_recorder(trace_dir):
    calls = []

    def wrapper(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        timestep = executor.class_obj.model_sampling.timestep(t)
        metadata = {"chunks": json.dumps(list(transformer_options.get("cond_or_uncond", []))),
                    "llmdiff_step": json.dumps(transformer_options.get(RECORD_KEY))}
        _save(os.path.join(trace_dir, f"unet_{len(calls):03d}.safetensors"),
              {"context": c_crossattn, "sigma": t, "timestep": timestep}, metadata)
        calls.append(True)
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    return wrapper


def _record_control(control, trace_dir):
    """Record what this ControlNet computes from. The object is this run's copy (ControlNetApplyAdvanced
    makes it); wrapping the method it had first keeps re-runs from stacking recorders."""
    original = control.__dict__.setdefault("_llmdiff_probe_original", control.get_control)
    calls = []

    def get_control(x_noisy, t, cond, batched_number, transformer_options):
        timestep = control.model_sampling_current.timestep(t)
        context = cond.get("crossattn_controlnet", cond["c_crossattn"])
        _save(os.path.join(trace_dir, f"control_{len(calls):03d}.safetensors"), {"context": context, "sigma": t, "timestep": timestep})
        calls.append(True)
        return original(x_noisy, t, cond, batched_number, transformer_options)

    control.get_control = get_control


NODE_CLASS_MAPPINGS = {"LLMDiffProbe": LLMDiffProbe}
