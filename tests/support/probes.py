"""The test-only LLMDiffProbe node (tests/e2e/probe_node.py) in an API prompt, and the trace it saves."""
from __future__ import annotations

import json

from support.workflows import nodes_of


def with_probe(api: dict, trace: bool = True) -> dict:
    """LLMDiffProbe (trace mode) between the sampler's model and the sampler, seeing its conditioning."""
    sampler = (nodes_of(api, "KSampler") or nodes_of(api, "KSamplerAdvanced"))[0]
    inputs = api[sampler]["inputs"]
    api["probe"] = {"class_type": "LLMDiffProbe", "inputs": {"model": inputs["model"], "positive": inputs["positive"],
                                                             "negative": inputs["negative"], "trace": trace}}
    inputs["model"] = ["probe", 0]
    return api


def read_trace(server) -> tuple[list[dict], list[dict]]:
    """(UNet calls, ControlNet calls) in call order, as the probe saved them."""
    from safetensors import safe_open

    def load(path):
        with safe_open(str(path), "pt") as f:
            record = {k: f.get_tensor(k) for k in f.keys()}
            record.update({k: json.loads(v) for k, v in (f.metadata() or {}).items()})
        return record

    trace = server.output_dir / "probe" / "trace"
    return [load(p) for p in sorted(trace.glob("unet_*.safetensors"))], [load(p) for p in sorted(trace.glob("control_*.safetensors"))]
