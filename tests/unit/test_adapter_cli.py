"""`python -m adapter init|inspect|upgrade`: outputs, exit codes, one-line errors."""
import builtins
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from adapter import __main__ as cli
from adapter.config import TargetSpec
from adapter.file_format import FORMAT_VERSION, read_adapter_config
from adapter.model import LLMDiffAdapter
from devkit.tiny_models import make_tiny_llm

REPO = Path(__file__).resolve().parents[2]
SMALL = ["--width", "64", "--heads", "4", "--refiner-layers", "1", "--resampler-layers", "1"]


def run_module(*args):
    """The real entry point, as a user runs it from the repo root."""
    return subprocess.run([sys.executable, "-m", "adapter", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})


def one_line_error(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


@pytest.fixture(scope="module")
def qwen_folder():
    return make_tiny_llm(family="qwen2")


@pytest.fixture(scope="module")
def adapter_file(qwen_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "qwen-sdxl.safetensors"
    assert cli.main(["init", "--llm", str(qwen_folder), "--target", "sdxl", "--out", str(out),
                     "--system-prompt", "Describe the image.", "--tokens", "154", *SMALL]) == 0
    return out


def test_init_writes_the_adapter_the_options_describe(adapter_file, qwen_folder):
    from adapter.llm import load_llm

    config = read_adapter_config(adapter_file)
    assert config.llm == load_llm(qwen_folder).info  # same LLMInfo as the loader reports, without loading weights
    assert config.target == TargetSpec("sdxl", 2048, 1280, 154)
    assert (config.arch.width, config.arch.heads, config.arch.refiner_layers, config.arch.resampler_layers) == (64, 4, 1, 1)
    assert config.template.system_prompt == "Describe the image." and config.template.use_chat_template
    assert config.template.chat_template == cli.folder_tokenizer(qwen_folder).chat_template  # recorded: governs every path
    assert config.training == {}


def test_init_llm_info_matches_the_loader_for_gemma3():
    from adapter.llm import load_llm

    folder = make_tiny_llm(family="gemma3")
    assert cli.llm_info_from_folder(folder) == load_llm(folder).info


def test_init_options_and_seed(qwen_folder, tmp_path):
    args = ["init", "--llm", str(qwen_folder), "--target", "custom", "--context-dim", "320", "--pooled-dim", "96",
            "--fusion", "last", "--no-chat-template", "--max-tokens", "32", "--instruction", "Draw:", *SMALL]
    assert cli.main([*args, "--out", str(tmp_path / "a.safetensors"), "--seed", "1"]) == 0
    assert cli.main([*args, "--out", str(tmp_path / "b.safetensors"), "--seed", "2"]) == 0
    config = read_adapter_config(tmp_path / "a.safetensors")
    assert (config.target.family, config.target.context_dim, config.target.pooled_dim) == ("custom", 320, 96)
    assert config.arch.fusion == "last"
    assert (config.template.use_chat_template, config.template.max_tokens, config.template.instruction) == (False, 32, "Draw:")

    def queries(name):
        with safe_open(tmp_path / name, "pt") as f:
            return f.get_tensor("queries")
    torch.manual_seed(1)  # --seed S means: the weights LLMDiffAdapter draws after torch.manual_seed(S)
    assert torch.equal(queries("a.safetensors"), LLMDiffAdapter(config).queries.detach())
    assert not torch.equal(queries("a.safetensors"), queries("b.safetensors"))


def test_init_refuses_bad_input(qwen_folder, tmp_path, capsys):
    out = str(tmp_path / "x.safetensors")
    assert cli.main(["init", "--llm", str(tmp_path), "--target", "sd15", "--out", out]) == cli.EXIT_BAD_INPUT
    assert "no config.json" in one_line_error(capsys.readouterr().err)
    assert cli.main(["init", "--llm", str(qwen_folder), "--target", "custom", "--out", out]) == cli.EXIT_BAD_INPUT
    assert "--context-dim" in one_line_error(capsys.readouterr().err)
    assert cli.main(["init", "--llm", str(qwen_folder), "--target", "sd15", "--out", out, "--width", "100"]) == cli.EXIT_BAD_INPUT
    assert "divisible" in one_line_error(capsys.readouterr().err)
    assert not Path(out).exists()
    Path(out).write_bytes(b"keep me")
    assert cli.main(["init", "--llm", str(qwen_folder), "--target", "sd15", "--out", out]) == cli.EXIT_USAGE
    assert "--force" in one_line_error(capsys.readouterr().err)
    assert Path(out).read_bytes() == b"keep me"


def test_inspect_prints_the_config(adapter_file, capsys):
    assert cli.main(["inspect", str(adapter_file)]) == cli.EXIT_OK
    out = capsys.readouterr().out
    for part in ("format_version 1", "Qwen2ForCausalLM (qwen2), hidden 64, 2 layers", "tokfp2:",
                 "sdxl: context [154, 2048], pooled [1280]", "width 64, 4 heads, 1 refiner + 1 resampler",
                 "system prompt 'Describe the image.'", "(untrained)", "layer mix:   0.333 0.333 0.333", "OK"):
        assert part in out, part


def bad_files(adapter_file: Path, folder: Path) -> dict[str, tuple[Path, str]]:
    """One of each kind of file inspect must refuse, with the words its one-line error must contain."""
    data = adapter_file.read_bytes()
    (folder / "truncated.safetensors").write_bytes(data[:-1000])
    (folder / "corrupt.safetensors").write_bytes(data[:8] + b"\xff" + data[9:])
    save_file({"w": torch.zeros(2)}, folder / "lora.safetensors")
    with safe_open(adapter_file, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = {**f.metadata(), "format_version": str(FORMAT_VERSION + 1)}
    save_file(tensors, folder / "newer.safetensors", metadata=metadata)
    torch.save({"w": torch.zeros(2)}, folder / "torch.safetensors")
    return {
        "missing": (folder / "missing.safetensors", "not found"),
        "truncated": (folder / "truncated.safetensors", "truncated"),
        "corrupt": (folder / "corrupt.safetensors", "corrupt"),
        "foreign": (folder / "lora.safetensors", "not an LLM Diff Adapter file (format=missing)"),
        "newer": (folder / "newer.safetensors", "update the pack"),
        "torch zip": (folder / "torch.safetensors", "pickle/PyTorch file"),
    }


def test_inspect_refuses_bad_files_with_one_line(adapter_file, tmp_path, capsys):
    for kind, (path, words) in bad_files(adapter_file, tmp_path).items():
        assert cli.main(["inspect", str(path)]) == cli.EXIT_BAD_FILE, kind
        assert words in one_line_error(capsys.readouterr().err), kind


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def test_real_entry_point_refuses_a_pickle_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps(Payload(marker)))
    result = run_module("inspect", evil)
    assert result.returncode == cli.EXIT_BAD_FILE
    assert "pickle/PyTorch file" in one_line_error(result.stderr)
    assert "Traceback" not in result.stderr
    assert not marker.exists()


def test_real_entry_point_inspects_a_good_file(adapter_file):
    shown = run_module("inspect", adapter_file)
    assert shown.returncode == 0, shown.stderr
    assert "sdxl: context [154, 2048], pooled [1280]" in shown.stdout


def test_usage_errors_and_help():
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["inspect"])
    assert exit_info.value.code == cli.EXIT_USAGE
    help_text = cli.build_parser().format_help()
    assert "exit codes:" in help_text and "bad adapter file" in help_text


def test_upgrade_rewrites_an_old_file_at_the_current_version(adapter_file, tmp_path, monkeypatch, capsys):
    from adapter import file_format

    with safe_open(adapter_file, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = {**f.metadata(), "format_version": str(FORMAT_VERSION - 1)}
    old = tmp_path / "old.safetensors"
    save_file(tensors, old, metadata=metadata)
    assert cli.main(["upgrade", str(old)]) == cli.EXIT_BAD_FILE  # no migration registered: refused, named
    assert "python -m adapter upgrade" in one_line_error(capsys.readouterr().err)

    monkeypatch.setitem(file_format.MIGRATIONS, FORMAT_VERSION - 1, file_format.Migration(config=lambda d: d))
    assert cli.main(["upgrade", str(old), "--out", str(tmp_path / "new.safetensors")]) == cli.EXIT_OK
    with safe_open(tmp_path / "new.safetensors", "pt") as f:
        assert f.metadata()["format_version"] == str(FORMAT_VERSION)
        assert json.loads(f.metadata()["config"]) == json.loads(metadata["config"])
        assert all(torch.equal(f.get_tensor(k), v) for k, v in tensors.items())


def test_inspect_describes_a_published_adapter(capsys):
    interop = Path(__file__).parent / "data" / "interop"
    assert cli.main(["inspect", str(interop / "ella_small.safetensors")]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "published adapter" in out and "layout ella-tsc" in out and "heads 4" in out and out.rstrip().endswith("OK")
