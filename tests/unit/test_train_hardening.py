"""Trainer inputs that used to slip through: broken captions, two runs in one output folder, a same-step
checkpoint replaced non-atomically, and the command line's first impression."""
import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap

import pytest
import torch
from PIL import Image

from devkit.train_runs import REPO
from training import checkpoint as ckpt
from training.config import CONFIGS_DIR, build_parser, list_presets
from training.data import DatasetError, scan_dataset
from training.output_lock import LOCK_NAME, OutputDirLocked, OutputLock
from training.train import main

BAD_UTF8 = b"a caf\xe9 at night"  # Latin-1, as many scraped captions are


def png(w=32, h=32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (0, 128, 255)).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# captions that are not UTF-8: skipped by name, like a broken image


def test_bad_utf8_caption_in_an_image_folder_is_skipped_by_name(tmp_path):
    for name, caption in [("good", b"a blue square"), ("bad", BAD_UTF8)]:
        (tmp_path / f"{name}.png").write_bytes(png())
        (tmp_path / f"{name}.txt").write_bytes(caption)
    ds = scan_dataset(str(tmp_path), 32, 16, 2.0, True)
    assert [s.name for s in ds.samples] == ["good.png"]
    assert ds.skipped == ["bad.png: caption is not valid UTF-8 (byte 5: b'\\xe9 at'); re-save it as UTF-8"]


def test_bad_utf8_line_in_metadata_jsonl_is_skipped_by_line(tmp_path):
    (tmp_path / "a.png").write_bytes(png())
    (tmp_path / "b.png").write_bytes(png())
    lines = [json.dumps({"file_name": "a.png", "text": "fine"}).encode(),
             b'{"file_name": "b.png", "text": "' + BAD_UTF8 + b'"}']
    (tmp_path / "metadata.jsonl").write_bytes(b"\n".join(lines))
    ds = scan_dataset(str(tmp_path), 32, 16, 2.0, True)
    assert [s.caption for s in ds.samples] == ["fine"]
    assert len(ds.skipped) == 1 and ds.skipped[0].startswith("metadata.jsonl line 2: caption is not valid UTF-8")


def test_bad_utf8_caption_in_a_tar_shard_is_skipped_and_nothing_usable_stops(tmp_path):
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in [("k1.png", png()), ("k1.txt", BAD_UTF8)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(DatasetError, match=r"1 candidate\(s\) were skipped: shard-000.tar:k1.txt: caption is not valid UTF-8"):
        scan_dataset(str(tmp_path), 32, 16, 2.0, True)


def test_the_skip_warning_counts_samples_per_reason(tmp_path, caplog):
    for name, image, caption in [("good", png(), b"fine"), ("bad_caption", png(), BAD_UTF8),
                                 ("bad_image", b"not a png", b"fine"), ("no_caption", png(), None)]:
        (tmp_path / f"{name}.png").write_bytes(image)
        if caption is not None:
            (tmp_path / f"{name}.txt").write_bytes(caption)
    with caplog.at_level("WARNING", logger="training.data"):
        ds = scan_dataset(str(tmp_path), 32, 16, 2.0, True)
    assert [s.name for s in ds.samples] == ["good.png"]
    warning = next(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert warning.startswith("skipped 3 sample(s) (caption is not valid UTF-8: 1, no caption file: 1, unreadable image: 1): "
                              "bad_caption.png: caption is not valid UTF-8"), warning
    assert "no_caption.png: no caption file no_caption.txt" in warning and "bad_image.png: unreadable image" in warning


# ---------------------------------------------------------------------------------------------
# one run per output folder

HOLDER = textwrap.dedent("""
    import sys
    from training.output_lock import OutputLock
    lock = OutputLock.acquire(sys.argv[1])
    print("locked", flush=True)
    sys.stdin.read()  # hold the lock until the test closes our stdin
    lock.release()
""")


@pytest.fixture
def holder(tmp_path):
    """A second process that holds the output folder's lock (a running training run, as far as the lock goes)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "out")], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert proc.stdout.readline().strip() == "locked"  # it holds the lock from here on: no sleep, no race
        yield proc
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)


def test_second_run_in_a_locked_output_folder_is_refused_naming_the_holder(tmp_path, holder, capsys):
    """The twin-run race, made deterministic: run B starts while run A provably holds the folder."""
    with pytest.raises(OutputDirLocked, match=rf"in use by another training run \(PID {holder.pid} on host"):
        OutputLock.acquire(tmp_path / "out")
    # The trainer itself refuses before loading anything (the paths need not even exist).
    code = main(["--base-model", str(tmp_path / "base"), "--llm", str(tmp_path / "llm"), "--data", str(tmp_path / "data"),
                 "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and f"PID {holder.pid}" in err and "--output-dir" in err, err
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_lock_is_released_at_exit_and_a_dead_holder_is_reported(tmp_path, caplog):
    with OutputLock.acquire(tmp_path) as lock:
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_NAME).exists()
    OutputLock.acquire(tmp_path).release()  # free again
    # a run killed with SIGKILL leaves its record behind; the kernel has dropped its lock
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": int(dead.stdout), "host": "node7", "started": 0}))
    with caplog.at_level("WARNING"), OutputLock.acquire(tmp_path) as lock:
        assert lock.stale["pid"] == int(dead.stdout)
    assert f"PID {int(dead.stdout)} on host node7" in caplog.text and "ended without releasing" in caplog.text


# ---------------------------------------------------------------------------------------------
# a checkpoint of the same step is replaced atomically


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the atomic swap is Linux's renameat2(RENAME_EXCHANGE)")
def test_resaving_a_step_never_leaves_it_missing(tmp_path, monkeypatch):
    def save(value):
        weights = {"w": torch.full((2,), value)}
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
        return ckpt.save(tmp_path, 5, weights, None, opt.state_dict(), {"step": 5}, keep=3)

    save(1.0)
    seen = []  # after every file-system change the save makes: is a complete step-5 checkpoint on disk?
    for name in ("rmtree", "move"):
        real = getattr(ckpt.shutil, name)

        def watched(*args, _real=real, **kwargs):
            out = _real(*args, **kwargs)
            seen.append((ckpt.latest(tmp_path) or tmp_path).name)
            return out
        monkeypatch.setattr(ckpt.shutil, name, watched)
    real_rename = os.rename

    def watched_rename(*args):
        real_rename(*args)
        seen.append((ckpt.latest(tmp_path) or tmp_path).name)
    monkeypatch.setattr(ckpt.os, "rename", watched_rename)
    path = save(2.0)
    assert set(seen) == {"step-00000005"}, seen
    assert ckpt.load(path)["trainable"]["w"].tolist() == [2.0, 2.0]
    assert [p.name for p in ckpt.checkpoints_dir(tmp_path).iterdir()] == ["step-00000005"]  # nothing left aside


# ---------------------------------------------------------------------------------------------
# the command line's first impression


def test_no_arguments_names_the_missing_inputs_before_printing_anything(capsys):
    assert main([]) == 2
    out, err = capsys.readouterr()
    assert out == "", out  # no resolved-config dump before the error
    assert err.count("\n") <= 4, err
    for flag in ("--base-model", "--llm", "--data"):
        assert flag in err
    assert "--help" in err


def test_print_config_still_needs_no_inputs(capsys):
    assert main(["--print-config"]) == 0
    assert '"output_dir"' in capsys.readouterr().out


def test_help_describes_presets_config_keys_and_ends_with_examples():
    text = build_parser().format_help()
    for preset in list_presets():  # one line each, with the first line of its TOML comment
        first = (CONFIGS_DIR / f"{preset}.toml").read_text().splitlines()[0].lstrip("# ").strip()
        assert any(line.strip().startswith(preset) and first[:30] in line for line in text.splitlines()), (preset, text)
    assert "(model.base_model)" in text and "--set model.base_model=" in text  # the key names are explained
    tail = text.rstrip().splitlines()[-6:]
    assert any("python -m training.train" in line for line in tail) and any("torchrun" in line for line in tail), tail


def test_the_nan_debug_hook_poisons_the_first_samples_context_and_only_while_active():
    """debug.inject_nan_at_step acts from outside the model: a forward hook on the adapter, gone after the step."""
    from support.adapters import HIDDEN, LAYERS, make_adapter
    from training.debug import nan_in_adapter_output

    adapter = make_adapter(False)
    states = torch.randn(2, LAYERS + 1, 5, HIDDEN, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 5, dtype=torch.long)
    with torch.no_grad():
        clean = adapter(states, mask).context
        with nan_in_adapter_output(adapter, True):
            poisoned = adapter(states, mask).context
        with nan_in_adapter_output(adapter, False):
            inactive = adapter(states, mask).context
        after = adapter(states, mask).context
    assert torch.isnan(poisoned[0]).all() and torch.equal(poisoned[1], clean[1])
    assert torch.equal(inactive, clean) and torch.equal(after, clean)
