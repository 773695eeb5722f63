"""Trainer data layouts, buckets and the reproducible, sharded epoch order; checkpoint files."""
import io
import json
import tarfile

import pytest
import torch
from PIL import Image

from training import checkpoint as ckpt
from training.data import DatasetError, epoch_batches, load_pixels, make_buckets, nearest_bucket, scan_dataset


def png(w, h, colour=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_metadata_jsonl_layout(tmp_path):
    (tmp_path / "a.png").write_bytes(png(64, 32))
    (tmp_path / "b.png").write_bytes(png(32, 64))
    rows = [{"file_name": "a.png", "text": "wide"}, {"file_name": "b.png", "text": "tall"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds = scan_dataset(str(tmp_path), 64, 16, 2.0, True)
    assert [s.caption for s in ds.samples] == ["wide", "tall"]
    assert [ds.buckets[b] for b in ds.bucket_of] == [(80, 48), (48, 80)]  # the closest aspect within 2:1


def test_tar_shards_and_skipped_members(tmp_path):
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in [("k1.png", png(32, 32)), ("k1.txt", b"one"), ("k2.png", b"garbage"), ("k2.txt", b"two"),
                           ("k3.png", png(32, 32))]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    ds = scan_dataset(str(tmp_path), 32, 16, 2.0, True)
    assert [s.name for s in ds.samples] == ["shard-000.tar:k1"]
    assert any("shard-000.tar:k2: unreadable image" in s for s in ds.skipped) and any("k3.png: no caption file k3.txt" in s for s in ds.skipped)
    pixels, sizes = load_pixels(ds.samples[0], (32, 32))
    assert pixels.shape == (3, 32, 32) and pixels[0].mean() == 1.0  # red channel at +1
    assert sizes.tolist() == [32, 32, 0, 0, 32, 32]


def test_empty_folder_error_says_what_to_do(tmp_path):
    with pytest.raises(DatasetError, match="no images .* were found.*same-named .txt captions"):
        scan_dataset(str(tmp_path), 32, 16, 2.0, True)


def test_buckets_respect_area_and_aspect():
    buckets = make_buckets(512, 64, 2.0)
    assert (512, 512) in buckets
    assert all(w * h <= 512 * 512 and max(w / h, h / w) <= 2.0 and w % 64 == 0 and h % 64 == 0 for w, h in buckets)
    assert buckets[nearest_bucket(buckets, 1920, 1080)][0] > buckets[nearest_bucket(buckets, 1920, 1080)][1]


def test_sdxl_size_conditioning_records_original_size_and_crop(tmp_path):
    (tmp_path / "a.png").write_bytes(png(100, 50))
    (tmp_path / "a.txt").write_text("x")
    ds = scan_dataset(str(tmp_path), 32, 16, 2.0, False)
    _, sizes = load_pixels(ds.samples[0], (32, 32))
    assert sizes.tolist() == [50, 100, 0, 16, 32, 32]  # resized to 64x32, centre crop from left 16


def test_epoch_order_is_reproducible_sharded_and_bucket_pure():
    bucket_of = [0] * 7 + [1] * 5
    a = epoch_batches(bucket_of, 2, seed=1, epoch=0, rank=0, world=1)
    assert a == epoch_batches(bucket_of, 2, seed=1, epoch=0, rank=0, world=1)
    assert a != epoch_batches(bucket_of, 2, seed=1, epoch=1, rank=0, world=1)
    assert sorted(i for b in a for i in b) == list(range(12))
    assert all(len({bucket_of[i] for i in b}) == 1 for b in a)
    r0, r1 = (epoch_batches(bucket_of, 2, 1, 0, r, 2) for r in (0, 1))
    assert len(r0) == len(r1) and not {i for b in r0 for i in b} & {i for b in r1 for i in b}


def test_checkpoint_roundtrip_rotation_and_incomplete_ignored(tmp_path):
    p = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    for step in (1, 2, 3):
        ckpt.save(tmp_path, step, {"w": p.detach()}, {"w": p.detach() * 2}, opt.state_dict(), {"step": step}, keep=2)
    assert [c.name for c in ckpt.complete_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]
    (ckpt.checkpoints_dir(tmp_path) / "step-00000009").mkdir()  # a folder without its sentinel
    assert ckpt.resolve_resume("latest", tmp_path).name == "step-00000003"
    loaded = ckpt.load(ckpt.latest(tmp_path))
    assert torch.equal(loaded["ema"]["w"], p.detach() * 2) and loaded["state"]["step"] == 3
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=0.1)
    opt2.load_state_dict(loaded["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    # reading the weights alone leaves the optimizer's file unopened (a bench reads many checkpoints' adapters)
    (ckpt.latest(tmp_path) / "optimizer.safetensors").unlink()
    weights_only = ckpt.load(ckpt.latest(tmp_path), optimizer=False)
    assert weights_only["optimizer"] is None and torch.equal(weights_only["trainable"]["w"], p.detach())
    with pytest.raises(ckpt.CheckpointError, match="not a complete checkpoint"):
        ckpt.resolve_resume(str(ckpt.checkpoints_dir(tmp_path) / "step-00000009"), tmp_path)
    assert ckpt.resolve_resume("latest", tmp_path / "nothing") is None


def test_a_checkpoints_adapter_has_the_weights_export_would_write(tmp_path):
    """One rule for export() and load_checkpoint_adapter(): the EMA weights when the run keeps an EMA, else the
    trained adapter's own (the `adapter.` entries of the trained weights, never the LoRA or loss-weighting ones)."""
    from support.adapters import make_adapter

    adapter = make_adapter(False)
    raw = {f"adapter.{n}": p.detach().clone() for n, p in adapter.named_parameters()}
    trainable = {**raw, "loss_fn.learned.weight": torch.ones(2)}
    ema = {n: p.detach() + 1 for n, p in adapter.named_parameters()}
    state = {"step": 5, "adapter_config": adapter.config.to_dict()}
    no_optimizer = {"state": {}, "param_groups": []}
    ckpt.save(tmp_path / "with-ema", 5, trainable, ema, no_optimizer, state, keep=1)
    ckpt.save(tmp_path / "no-ema", 5, trainable, None, no_optimizer, state, keep=1)

    with_ema = ckpt.load_checkpoint_adapter(ckpt.latest(tmp_path / "with-ema"))
    without = ckpt.load_checkpoint_adapter(ckpt.latest(tmp_path / "no-ema"))
    assert not with_ema.training and next(with_ema.parameters()).dtype == torch.float32
    for name, p in with_ema.named_parameters():
        assert torch.equal(p, ema[name]), name
    for name, p in without.named_parameters():
        assert torch.equal(p, raw[f"adapter.{name}"]), name
    assert ckpt.adapter_weights(trainable, ema)[1] == "ema"
    weights, kind = ckpt.adapter_weights(trainable, None)
    assert kind == "raw" and set(weights) == set(ema)
