"""VAE latents cached on disk, so that each image goes through the VAE once per base model, not once per step.

One safetensors file per (image content, bucket, VAE weights): the key hashes all three, so an edited
image, a different resolution or another VAE can never be served a stale latent, and two datasets
sharing images share entries. Files are written to a temporary name and renamed, so a crash or a
second process writing the same entry never leaves a half file.

The trainer fills the cache in a step of its own, before `Accelerator()` starts any multi-process
communication: each process encodes every world_size-th sample (rank and world size from the
launcher's environment), so a slow VAE pass cannot hit a collective timeout. After the first barrier,
`index` finds every entry, and encodes locally whatever another node wrote to a disk this one cannot see.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import load_file, save_file

from training.data import Dataset, load_pixels

log = logging.getLogger(__name__)

CACHE_VERSION = "1"


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """sha256 over the VAE's weights and config: a changed VAE means new latents."""
    digest = hashlib.sha256(CACHE_VERSION.encode())
    digest.update(repr(sorted(dict(vae.config).items())).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


class TensorStore:
    """A folder of safetensors files, one per key (sharded by the key's first two hex digits), written
    atomically. Shared by the latent cache and the LLM-state cache (training/state_cache.py)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> Optional[dict[str, torch.Tensor]]:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return load_file(str(path))
        except Exception as err:  # noqa: BLE001 - a damaged entry is computed again, not fatal
            log.warning("cache entry %s is unreadable (%s); computing it again", path, err)
            return None

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, path)


class LatentCache(TensorStore):
    def __init__(self, folder: Path, vae_fp: str):
        super().__init__(folder)
        self.vae_fp = vae_fp

    def key(self, image_bytes: bytes, bucket: tuple[int, int]) -> str:
        digest = hashlib.sha256(image_bytes)
        digest.update(f"|{bucket[0]}x{bucket[1]}|{self.vae_fp}".encode())
        return digest.hexdigest()


def fill(dataset: Dataset, cache: LatentCache, encode: Callable[[torch.Tensor], torch.Tensor], indices: list[int],
         device, show_progress: bool = False) -> tuple[dict[int, str], list[str]]:
    """Make sure the samples at `indices` have a cache entry; returns {index: key} and the names that failed."""
    from tqdm.auto import tqdm

    keys: dict[int, str] = {}
    failed: list[str] = []
    encoded = 0
    for i in tqdm(indices, desc="latent cache", disable=not show_progress, dynamic_ncols=True, leave=False):
        sample, bucket = dataset.samples[i], dataset.buckets[dataset.bucket_of[i]]
        try:
            key = cache.key(sample.read_bytes(), bucket)
            if not cache.path(key).is_file():
                pixels, sizes = load_pixels(sample, bucket)
                latent = encode(pixels[None].to(device))[0].float()
                cache.put(key, {"latent": latent, "sizes": sizes})
                encoded += 1
        except Exception as err:  # noqa: BLE001 - unreadable images are skipped, counted and named
            failed.append(f"{sample.name}: unreadable image ({type(err).__name__}: {err})")
            continue
        keys[i] = key
    if encoded:
        log.info("latent cache: encoded %d of %d images into %s", encoded, len(indices), cache.folder)
    return keys, failed
