"""Timestep-aware adapters in ComfyUI: each conditioning's context recomputed at every sampling step's timestep.

    LLMDiffTextEncode --(model_cond.attach_step_states)--> CONDITIONING carrying the prompt's StepStates
    LLMDiffApplyAdapter --(wrapper.patch_model)--> MODEL whose CALC_COND_BATCH wrapper decodes them per call

- model_cond.py: what the conditioning carries (`model_conds` key, StepStatesCond) and how ComfyUI treats it.
- wrapper.py: the sampling wrapper that gives every such entry its context at the call's real timestep.
- adapter/timestep_contexts.py (pure torch, no ComfyUI): StepStates and StepContexts, the padding, batching and
  per-call cache both of these use; the benchmarks and its reference test run it without ComfyUI.

Nothing is imported here: the node modules import these files when they first run.
"""
