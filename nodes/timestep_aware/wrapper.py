"""LLMDiffApplyAdapter's wrapper: each conditioning entry's context at the real timestep of every model call.

ComfyUI's `calc_cond_batch` (comfy/samplers.py) turns the sampler's cond/uncond lists into UNet
calls: per entry it reads `model_conds` (get_area_and_mult), batches compatible entries, computes
ControlNet from the batched `c_crossattn` (control.get_control) and only then calls the model, so a
`model_function_wrapper` or an APPLY_MODEL wrapper would change the context after ControlNet has
seen the old one. This wrapper sits one level up, on WrappersMP.CALC_COND_BATCH: before any of that
runs it gives every entry that carries our StepStates (model_cond.py) a new `c_crossattn`, the
adapter's tokens decoded at this call's timestep, so the UNet and every ControlNet see one and the
same context. It never mutates the sampler's entries (it passes shallow copies on) and removes the
states key from the copies, so our entries batch with entries that lack it (a CLIP negative).

The timestep is the model's own: `model.model_sampling.timestep(sigma)`, the 0..999 DDPM index the
UNet itself is called with, for any sampler, scheduler, denoise and start/end step. The LLM never
runs here: the per-prompt part was computed by LLMDiffTextEncode; per call there is one `decode` of
all (entry, timestep) pairs (adapter/timestep_contexts.py), cached per (timestep, entry) for the call.

What the wrapper did is put into the call's transformer_options under RECORD_KEY (timesteps, entries
seen, entries recomputed, pairs decoded), where patches and tests can read it.
"""
from __future__ import annotations

import logging
import weakref

import comfy.conds
import comfy.model_management as mm
import comfy.model_patcher
import comfy.patcher_extension

from ...adapter.errors import AdapterMismatchError
from ...adapter.model import NUM_TRAIN_TIMESTEPS
from ...adapter.timestep_contexts import StepContexts
from .model_cond import STATES_KEY

log = logging.getLogger(__name__)

WRAPPER_KEY = "llmdiff_timestep_context"  # our key among the model's CALC_COND_BATCH wrappers
ADDITIONAL_MODELS_KEY = "llmdiff_adapters"  # the adapters' patchers, loaded with the UNet
RECORD_KEY = "llmdiff_step"  # transformer_options entry describing what the wrapper did in this call


class TimestepContextWrapper:
    """A CALC_COND_BATCH wrapper holding the adapters (by file identity) whose entries it recomputes."""

    def __init__(self, adapters: dict, patchers: dict):
        self.adapters = adapters  # identity -> nodes.handles.AdapterHandle
        self.patchers = patchers  # identity -> ModelPatcher of the adapter on the UNet's load device
        self._warned = weakref.WeakSet()  # StepStates already reported as changed by another node

    def __call__(self, executor, model, conds, x_in, timestep, model_options):
        timesteps = model.model_sampling.timestep(timestep).float().tolist()  # one per sample of x_in
        _check_range(timesteps, model)
        ours = self._find_ours(conds)
        contexts = self._decode(ours, timesteps)
        conds = [None if cond is None else list(cond) for cond in conds]  # new lists: the sampler's stay as they are
        for i, j, states, redo in ours:
            entry = conds[i][j]
            # Without the states key the entry batches with entries that lack it (a CLIP negative).
            model_conds = {k: v for k, v in entry["model_conds"].items() if k != STATES_KEY}
            if redo:
                context = contexts[states.adapter_id].context(states, model_conds["c_crossattn"].cond, timesteps)
                model_conds["c_crossattn"] = comfy.conds.CONDCrossAttn(context)
            conds[i][j] = {**entry, "model_conds": model_conds}

        record = {"timesteps": timesteps, "entries": sum(len(cond or ()) for cond in conds),
                  "recomputed": sum(redo for *_, redo in ours), "decoded": sum(c.decoded for c in contexts.values())}
        model_options = {**model_options, "transformer_options": {**model_options.get("transformer_options", {}), RECORD_KEY: record}}
        return executor(model, conds, x_in, timestep, model_options)

    def _find_ours(self, conds) -> list:
        """(list index, entry index, StepStates, recompute?) for every entry carrying our states."""
        ours = []
        for i, cond in enumerate(conds):
            for j, entry in enumerate(cond or ()):
                holder = entry.get("model_conds", {}).get(STATES_KEY)
                if holder is None:
                    continue
                states = holder.cond
                if states.adapter_id not in self.adapters:
                    raise AdapterMismatchError(self._mismatch(states))
                untouched = states.is_untouched(entry["model_conds"]["c_crossattn"].cond)
                if not untouched:
                    self._warn_changed(states)
                ours.append((i, j, states, untouched))
        return ours

    def _decode(self, ours: list, timesteps: list) -> dict:
        """adapter identity -> StepContexts holding every entry to recompute at `timesteps` (one decode each)."""
        contexts = {}
        for adapter_id in dict.fromkeys(s.adapter_id for _, _, s, redo in ours if redo):
            contexts[adapter_id] = StepContexts(self._ready(adapter_id))
            contexts[adapter_id].prepare([s for _, _, s, redo in ours if redo and s.adapter_id == adapter_id], timesteps)
        return contexts

    def _ready(self, adapter_id: str):
        """The adapter module, whole on one device. ComfyUI loads it with the UNet (an additional model
        of the patched MODEL); only if memory pressure left it split is it loaded completely here."""
        module = self.adapters[adapter_id].module
        if len({p.device for p in module.parameters()}) > 1:
            mm.load_models_gpu([self.patchers[adapter_id]], force_full_load=True)
        return module

    def _mismatch(self, states) -> str:
        have = ", ".join(repr(h.name) for h in self.adapters.values())
        return (f"a conditioning was encoded with the LLM Diff Adapter {states.adapter_name!r}, but the model was "
                f"patched by Apply LLM Diff Adapter with {have}: connect the same Load LLM Diff Adapter to "
                "LLM Diff Text Encode and to Apply LLM Diff Adapter (or chain one Apply node per adapter)")

    def _warn_changed(self, states) -> None:
        if states not in self._warned:
            self._warned.add(states)
            log.warning("Apply LLM Diff Adapter: a conditioning from LLM Diff Text Encode (%s) was changed by another "
                        "node (e.g. Conditioning Average or Zero Out), so its context stays at the fixed fallback "
                        "timestep", states.adapter_name)


def _check_range(timesteps: list, model) -> None:
    if any(not 0 <= t <= NUM_TRAIN_TIMESTEPS for t in timesteps):
        raise ValueError(
            f"Apply LLM Diff Adapter: this model's sampling ({type(model.model_sampling).__name__}) gives timesteps "
            f"{timesteps}, outside the 0..{NUM_TRAIN_TIMESTEPS} DDPM range the adapter was trained on; use an SD1.5, "
            "SD2 or SDXL model with its discrete (eps or v) sampling"
        )


def sampling_patcher(adapter, model) -> comfy.model_patcher.ModelPatcher:
    """The ModelPatcher that loads the adapter's module on the UNet's device for sampling.

    It wraps the same module as the adapter's text-encoder patcher, so ComfyUI treats the two as
    clones: loading one first offloads the other, and the weights exist once. It is kept on the
    module (one per device), so it lives as long as the adapter: a patcher that died while ComfyUI
    still listed it as loaded would make every later load warn of a leak and run a full gc.collect().
    """
    holder = adapter.patcher.model
    patchers = getattr(holder, "llmdiff_sampling_patchers", None)
    if patchers is None:
        patchers = holder.llmdiff_sampling_patchers = {}
    key = str(model.load_device)
    if key not in patchers:
        patchers[key] = comfy.model_patcher.ModelPatcher(holder, load_device=model.load_device,
                                                         offload_device=adapter.patcher.offload_device)
    return patchers[key]


def context_width(model) -> int:
    """The cross-attention width the model's UNet expects, from ComfyUI's model config."""
    unet_config = getattr(getattr(model.model, "model_config", None), "unet_config", None) or {}
    width = unet_config.get("context_dim")
    if not width:
        raise ValueError(
            f"Apply LLM Diff Adapter: this model ({type(model.model).__name__}) has no cross-attention context width "
            "in its config; LLM Diff Adapters condition SD1.5, SD2 and SDXL UNets"
        )
    return int(width)


def patch_model(model, adapter):
    """A clone of `model` whose CALC_COND_BATCH wrapper also recomputes `adapter`'s entries.

    Applying a second adapter to an already patched model adds it to the same wrapper (one wrapper,
    one decode per adapter per call); the input model is never changed.
    """
    patched = model.clone()
    previous = patched.get_wrappers(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, WRAPPER_KEY)
    adapters, patchers = {}, {}
    for wrapper in previous:
        adapters.update(wrapper.adapters)
        patchers.update(wrapper.patchers)
    adapters[adapter.identity] = adapter
    patchers[adapter.identity] = sampling_patcher(adapter, model)
    patched.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, WRAPPER_KEY)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, WRAPPER_KEY,
                                 TimestepContextWrapper(adapters, patchers))
    patched.set_additional_models(ADDITIONAL_MODELS_KEY, list(patchers.values()))
    return patched
