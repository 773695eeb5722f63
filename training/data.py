"""Training data: find image/caption pairs, bucket them by aspect ratio, and order them reproducibly.

Three layouts are read (docs/design.md section 4):
* an image folder (searched recursively) where `photo.png` has its caption in `photo.txt`;
* a folder with `metadata.jsonl` (diffusers' ImageFolder convention: {"file_name": ..., "text": ...} per line);
* webdataset `.tar` shards (a .tar file, a folder of them, or a glob): members `key.jpg|png|webp` and
  `key.txt`. They are indexed and read with the standard library's `tarfile`, so the format needs no
  extra package.

Images are opened once at scan time (header only) to learn their size for bucketing; any that cannot
be opened, and any caption that is not valid UTF-8, are skipped, counted and named in the log. The epoch order is a pure function of
(seed, epoch), so a resumed run sees exactly the batches an uninterrupted run would have.
"""
from __future__ import annotations

import glob
import io
import json
import logging
import math
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class DatasetError(ValueError):
    """The dataset is missing, empty or unusable; the message says why and what to fix."""


@dataclass
class Sample:
    name: str  # what error messages call it: a relative path or shard:key
    caption: str
    width: int
    height: int
    source: str  # file path, or the shard path for tar members
    member: str = ""  # tar member name ("" for plain files)

    def read_bytes(self) -> bytes:
        if not self.member:
            return Path(self.source).read_bytes()
        with tarfile.open(self.source) as tar:
            handle = tar.extractfile(self.member)
            if handle is None:
                raise OSError(f"{self.member} is not a file in {self.source}")
            return handle.read()


@dataclass
class Dataset:
    samples: list[Sample]
    buckets: list[tuple[int, int]]  # (width, height) in pixels
    bucket_of: list[int]  # bucket index per sample
    name: str
    skipped: list[str] = field(default_factory=list)  # "name: reason"


# ---------------------------------------------------------------------------------------------
# finding samples


def _probe(data: bytes | str) -> tuple[int, int]:
    """(width, height) from the image header, raising on anything PIL cannot identify."""
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
        return img.size


def decode_caption(raw: bytes, where: str, skipped: list[str]) -> str | None:
    """UTF-8 text, or None after naming `where` in `skipped`: a broken caption skips its sample, as a broken image does."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        skipped.append(f"{where}: caption is not valid UTF-8 (byte {err.start}: {raw[err.start:err.start + 4]!r}); "
                       "re-save it as UTF-8")
        return None


# Why a sample is skipped: each entry of Dataset.skipped reads "<sample>: <reason> ..." with one of these reasons.
SKIP_REASONS = ("unreadable image", "caption is not valid UTF-8", "no caption file")


def describe_skipped(skipped: list[str]) -> str:
    """'3 sample(s) (unreadable image: 2, caption is not valid UTF-8: 1)': how many, and how many for each reason."""
    counts = Counter(next((r for r in SKIP_REASONS if f": {r}" in entry), "other") for entry in skipped)
    return f"{len(skipped)} sample(s) ({', '.join(f'{reason}: {n}' for reason, n in counts.items())})"


def _folder_candidates(root: Path, skipped: list[str]) -> list[tuple[str, str, str, str]]:
    out = []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS):
        caption_file = path.with_suffix(".txt")
        if not caption_file.is_file():
            skipped.append(f"{path.relative_to(root)}: no caption file {caption_file.name}")
            continue
        caption = decode_caption(caption_file.read_bytes(), str(path.relative_to(root)), skipped)
        if caption is not None:
            out.append((str(path.relative_to(root)), caption.strip(), str(path), ""))
    return out


def _jsonl_candidates(root: Path, image_column: str, caption_column: str, skipped: list[str]) -> list[tuple[str, str, str, str]]:
    out = []
    for number, raw in enumerate((root / "metadata.jsonl").read_bytes().splitlines(), 1):
        line = decode_caption(raw, f"metadata.jsonl line {number}", skipped)
        if line is None or not line.strip():
            continue
        try:
            row = json.loads(line)
            out.append((row[image_column], str(row[caption_column]).strip(), str(root / row[image_column]), ""))
        except (json.JSONDecodeError, KeyError) as err:
            raise DatasetError(
                f"{root / 'metadata.jsonl'} line {number}: expected a JSON object with {image_column!r} and "
                f"{caption_column!r} keys ({type(err).__name__}: {err}); set data.image_column / data.caption_column"
            ) from None
    return out


def _shard_paths(spec: str) -> list[Path]:
    path = Path(spec)
    if path.is_dir():
        return sorted(path.glob("*.tar"))
    if path.suffix == ".tar" and path.is_file():
        return [path]
    return sorted(Path(p) for p in glob.glob(spec) if p.endswith(".tar"))


def _tar_candidates(shards: list[Path], skipped: list[str]) -> list[tuple[str, str, str, str]]:
    out = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
            for name in sorted(members):
                stem, ext = name.rsplit(".", 1) if "." in name else (name, "")
                if f".{ext.lower()}" not in IMAGE_EXTS:
                    continue
                caption = members.get(f"{stem}.txt")
                if caption is None:
                    skipped.append(f"{shard.name}:{name}: no caption file {stem}.txt in the shard")
                    continue
                text = decode_caption(tar.extractfile(caption).read(), f"{shard.name}:{caption.name}", skipped)
                if text is not None:
                    out.append((f"{shard.name}:{stem}", text.strip(), str(shard), name))
    return out


def find_candidates(path: str, image_column: str, caption_column: str,
                    skipped: list[str]) -> tuple[str, list[tuple[str, str, str, str]]] | None:
    """(layout, [(name, caption, image file or shard, tar member or "")]) of a dataset in any of the three layouts;
    None when `path` is none of them. Images are not opened yet; a missing or broken caption is named in `skipped`.
    The distill stage reads a dataset's captions through this too."""
    root = Path(path)
    if root.is_dir() and (root / "metadata.jsonl").is_file():
        return "metadata.jsonl", _jsonl_candidates(root, image_column, caption_column, skipped)
    if _shard_paths(path):
        return "tar shards", _tar_candidates(_shard_paths(path), skipped)
    if root.is_dir():
        return "image folder", _folder_candidates(root, skipped)
    return None


def scan_dataset(path: str, resolution: int, bucket_step: int, max_aspect: float, use_buckets: bool,
                 name: str = "", image_column: str = "file_name", caption_column: str = "text") -> Dataset:
    """Find every usable sample and assign it a bucket; raise DatasetError when nothing is usable."""
    if not path:
        raise DatasetError("no dataset given: pass --data <image folder | folder with metadata.jsonl | .tar shards>")
    root = Path(path)
    skipped: list[str] = []
    found = find_candidates(path, image_column, caption_column, skipped)
    if found is None:
        raise DatasetError(f"dataset {path} does not exist (expected a folder or .tar shards)")
    layout, candidates = found

    samples: list[Sample] = []
    for sample_name, caption, source, member in candidates:
        try:
            probe_from = Sample(sample_name, caption, 0, 0, source, member).read_bytes() if member else source
            width, height = _probe(probe_from)
        except Exception as err:  # noqa: BLE001 - any unreadable image is skipped and named
            skipped.append(f"{sample_name}: unreadable image ({type(err).__name__}: {err})")
            continue
        samples.append(Sample(sample_name, caption, width, height, source, member))

    if skipped:
        log.warning("skipped %s: %s", describe_skipped(skipped), "; ".join(skipped[:20]) + (" ..." if len(skipped) > 20 else ""))
    if not samples:
        why = f"{len(skipped)} candidate(s) were skipped: {'; '.join(skipped[:10])}" if skipped else (
            f"no images ({', '.join(IMAGE_EXTS)}) were found")
        raise DatasetError(
            f"dataset {path} ({layout}) yields no training samples: {why}. Put images with same-named .txt "
            "captions in the folder, or a metadata.jsonl with file_name/text rows, or .tar shards with key.jpg + key.txt."
        )
    buckets = make_buckets(resolution, bucket_step, max_aspect) if use_buckets else [(resolution, resolution)]
    bucket_of = [nearest_bucket(buckets, s.width, s.height) for s in samples]
    log.info("dataset %s: %d samples (%s), %d skipped, buckets %s", path, len(samples), layout, len(skipped),
             sorted({buckets[b] for b in bucket_of}))
    return Dataset(samples, buckets, bucket_of, name or root.stem or root.name, skipped)


# ---------------------------------------------------------------------------------------------
# aspect-ratio buckets


def make_buckets(resolution: int, step: int, max_aspect: float) -> list[tuple[int, int]]:
    """(width, height) pairs, multiples of `step`, area <= resolution^2, aspect within max_aspect."""
    if resolution % step:
        raise DatasetError(f"data.resolution ({resolution}) must be a multiple of data.bucket_step ({step})")
    area = resolution * resolution
    buckets = set()
    for width in range(step, int(resolution * max_aspect) + 1, step):
        height = (area // width) // step * step
        if height >= step and max(width / height, height / width) <= max_aspect + 1e-9:
            buckets.add((width, height))
    return sorted(buckets)


def nearest_bucket(buckets: list[tuple[int, int]], width: int, height: int) -> int:
    """The bucket whose aspect ratio is closest in log space (so 2:1 and 1:2 are equally far from 1:1)."""
    target = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][0] / buckets[i][1]) - target))


def load_pixels(sample: Sample, bucket: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize to cover the bucket, centre-crop; returns pixels [3, H, W] in [-1, 1] and SDXL's size
    conditioning [6] = (original h, w, crop top, crop left, target h, w)."""
    bucket_w, bucket_h = bucket
    with Image.open(io.BytesIO(sample.read_bytes())) as img:
        img = img.convert("RGB")
        scale = max(bucket_w / img.width, bucket_h / img.height)
        new_w, new_h = max(bucket_w, round(img.width * scale)), max(bucket_h, round(img.height * scale))
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
        left, top = (new_w - bucket_w) // 2, (new_h - bucket_h) // 2
        img = img.crop((left, top, left + bucket_w, top + bucket_h))
        array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    pixels = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    sizes = torch.tensor([sample.height, sample.width, top, left, bucket_h, bucket_w], dtype=torch.float32)
    return pixels, sizes


# ---------------------------------------------------------------------------------------------
# reproducible order


def epoch_batches(bucket_of: list[int], batch_size: int, seed: int, epoch: int, rank: int, world: int) -> list[list[int]]:
    """This rank's batches for one epoch: shuffled within buckets (a batch never mixes shapes),
    batches shuffled, then dealt round-robin so every rank gets the same number of batches."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    batches: list[list[int]] = []
    for bucket in sorted(set(bucket_of)):
        members = [i for i, b in enumerate(bucket_of) if b == bucket]
        members = [members[j] for j in torch.randperm(len(members), generator=gen).tolist()]
        batches += [members[k:k + batch_size] for k in range(0, len(members), batch_size)]
    batches = [batches[j] for j in torch.randperm(len(batches), generator=gen).tolist()]
    per_rank = len(batches) // world
    if per_rank == 0:
        raise DatasetError(f"the dataset gives {len(batches)} batch(es) of up to {batch_size} per epoch, fewer than "
                           f"the {world} processes; add images or lower the number of processes")
    return batches[rank::world][:per_rank]
