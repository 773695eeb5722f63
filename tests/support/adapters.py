"""Small random adapters for the adapter and node tests (a made-up 3-layer, 32-wide LLM; no files)."""
import torch

from adapter.config import AdapterConfig, ArchConfig, LLMInfo, make_target
from adapter.model import LLMDiffAdapter

HIDDEN, LAYERS = 32, 3


def make_config(timestep_aware: bool, target="custom", timestep_blocks=1):
    target_spec = make_target("custom", 8, context_dim=48, pooled_dim=40) if target == "custom" else make_target(target)
    return AdapterConfig(
        llm=LLMInfo("TinyForCausalLM", "tiny", HIDDEN, LAYERS, "tokfp1:" + "0" * 64),
        target=target_spec,
        arch=ArchConfig(width=64, heads=4, refiner_layers=1, resampler_layers=2, timestep_aware=timestep_aware,
                        timestep_blocks=timestep_blocks),
    )


def make_adapter(timestep_aware: bool, seed=0, **kw) -> LLMDiffAdapter:
    torch.manual_seed(seed)
    return LLMDiffAdapter(make_config(timestep_aware, **kw)).eval()


def trained_like(adapter: LLMDiffAdapter) -> LLMDiffAdapter:
    """Give the zero-initialised modulation weights values, as training would, so the timestep matters."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if ".modulation." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return adapter
