"""Comparing saved model weights tensor by tensor (two saves of the same tensors may differ in their bytes)."""
from __future__ import annotations

from pathlib import Path

# A saved part's weights: transformers writes model.safetensors, diffusers diffusion_pytorch_model.safetensors.
WEIGHT_FILES = ("model.safetensors", "diffusion_pytorch_model.safetensors")


def weights_file(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"no {' or '.join(WEIGHT_FILES)} in {folder}")


def differing_tensors(a: Path, b: Path) -> list[str]:
    """The keys whose tensors differ between two saved model folders (missing on one side included); [] if equal."""
    import torch
    from safetensors.torch import load_file

    ours, theirs = (load_file(str(weights_file(folder))) for folder in (a, b))
    return sorted(key for key in ours.keys() | theirs.keys()
                  if key not in ours or key not in theirs or not torch.equal(ours[key], theirs[key]))
