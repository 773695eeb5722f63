"""The trainer's test-only hooks (the config's [debug] section), applied from outside the model code so that
the integration tests reach the trainer's error paths through its real command line on tiny models.

    with nan_in_adapter_output(raw.adapter, step in cfg.debug.inject_nan_at_step):
        loss, logs = student(...)
"""
from __future__ import annotations

from contextlib import contextmanager

from torch import nn


@contextmanager
def nan_in_adapter_output(adapter: nn.Module, active: bool):
    """While `active`, the adapter's context for the batch's first sample is NaN (debug.inject_nan_at_step): that
    sample's prediction and loss turn non-finite as a diverging run's would, and the trainer's own handling
    (skip the step, name the sample, stop past max_nonfinite_steps) must catch it."""
    if not active:
        yield
        return

    def poison(module, args, output):
        context = output.context.clone()
        context[0] = float("nan")
        return output._replace(context=context)

    handle = adapter.register_forward_hook(poison)
    try:
        yield
    finally:
        handle.remove()
