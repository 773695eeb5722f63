"""The adapter file: round trip, atomic writes, and every way a file can be refused."""
import builtins
import json
import logging
import pickle
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from adapter import file_format
from adapter.config import AdapterConfig, ArchConfig, LLMInfo, TemplateConfig, make_target
from adapter.errors import AdapterFileError, AdapterMismatchError
from adapter.file_format import (
    FORMAT,
    FORMAT_VERSION,
    Migration,
    check_context_dim,
    check_llm_matches,
    load_adapter,
    read_adapter_config,
    save_adapter,
)
from adapter.model import LLMDiffAdapter

LLM = LLMInfo("Qwen2ForCausalLM", "qwen2", 32, 3, "tokfp1:" + "a" * 64, name="tiny-qwen")


def make_config(target="sd15", **kw):
    return AdapterConfig(
        llm=LLM,
        target=make_target(target),
        template=TemplateConfig(system_prompt="Describe the image.", max_tokens=128),
        arch=ArchConfig(width=64, heads=4, refiner_layers=1, resampler_layers=1, **kw),
    )


def make_adapter(target="sd15", **kw):
    torch.manual_seed(0)
    return LLMDiffAdapter(make_config(target, **kw)).eval()


def inputs():
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, 4:] = 0
    return torch.randn(2, 4, 7, 32, generator=g), mask


@pytest.fixture
def saved(tmp_path):
    adapter = make_adapter("sdxl")
    path = save_adapter(tmp_path / "a.safetensors", adapter)
    return adapter, path


class Payload:
    """Unpickling this creates the file `marker`: the proof that a pickle reader ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def rewrite_metadata(src, dst, **changes):
    """A copy of an adapter file with some metadata entries replaced (None removes one)."""
    with safe_open(src, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = dict(f.metadata())
    metadata.update(changes)
    save_file(tensors, dst, metadata={k: v for k, v in metadata.items() if v is not None})
    return dst


# --------------------------------------------------------------------------- round trip


def test_round_trip_gives_bit_identical_outputs(saved):
    adapter, path = saved
    loaded = load_adapter(path)
    assert loaded.config == adapter.config
    assert not loaded.training  # returned in eval mode
    states, mask = inputs()
    with torch.no_grad():
        expected, got = adapter(states, mask), loaded(states, mask)
    assert torch.equal(got.context, expected.context)
    assert torch.equal(got.pooled, expected.pooled)


def test_file_carries_format_metadata_and_config(saved):
    adapter, path = saved
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == FORMAT == "llm-diff-adapter"
    assert metadata["format_version"] == str(FORMAT_VERSION)
    assert json.loads(metadata["config"]) == adapter.config.to_dict()
    assert read_adapter_config(path) == adapter.config


def test_load_in_another_dtype(saved):
    _, path = saved
    loaded = load_adapter(path, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


def test_save_with_provenance_and_refuse_a_config_of_another_shape(tmp_path):
    adapter = make_adapter()
    trained = make_config()
    trained.training = {"steps": 1000, "dataset": "shapes"}
    save_adapter(tmp_path / "t.safetensors", adapter, trained)
    assert read_adapter_config(tmp_path / "t.safetensors").training == {"steps": 1000, "dataset": "shapes"}
    with pytest.raises(AdapterFileError, match=r"wrong shapes .*context_head\.proj\.weight"):
        save_adapter(tmp_path / "bad.safetensors", adapter, make_config("sd2"))
    assert not (tmp_path / "bad.safetensors").exists()


def test_save_is_atomic(tmp_path, monkeypatch):
    path = save_adapter(tmp_path / "a.safetensors", make_adapter())
    before = path.read_bytes()

    def broken_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(path, make_adapter("sd2"))
    assert path.read_bytes() == before  # the old file is intact...
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]  # ...and no temp file is left


def test_save_needs_the_safetensors_suffix(tmp_path):
    with pytest.raises(AdapterFileError, match=r"must end in \.safetensors"):
        save_adapter(tmp_path / "a.pt", make_adapter())


# --------------------------------------------------------------------------- refused files


@pytest.mark.parametrize("name", ["evil.safetensors", "evil.pt"])
def test_pickle_payload_is_refused_without_unpickling(tmp_path, name):
    marker = tmp_path / "pwned"
    # The payload is real: unpickling it does create the marker.
    pickle.loads(pickle.dumps(Payload(tmp_path / "proof")))
    assert (tmp_path / "proof").exists()

    path = tmp_path / name
    path.write_bytes(pickle.dumps({"weights": Payload(marker)}, protocol=4))
    for reader in (load_adapter, read_adapter_config):
        with pytest.raises(AdapterFileError, match=r"pickle/PyTorch file; adapters must be \.safetensors"):
            reader(path)
    assert not marker.exists()


def test_torch_zip_file_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.safetensors"
    torch.save({"w": torch.zeros(2), "evil": Payload(marker)}, path)
    assert path.read_bytes()[:4] == b"PK\x03\x04"
    with pytest.raises(AdapterFileError, match="pickle/PyTorch file"):
        load_adapter(path)
    assert not marker.exists()


def test_missing_file(tmp_path):
    with pytest.raises(AdapterFileError, match="adapter file not found"):
        load_adapter(tmp_path / "nope.safetensors")


def test_truncated_file(saved):
    _, path = saved
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(AdapterFileError, match=r"is truncated: its header promises \d+ bytes of tensor data but only \d+"):
        load_adapter(path)
    path.write_bytes(data[:5])
    with pytest.raises(AdapterFileError, match="only 5 bytes"):
        load_adapter(path)
    path.write_bytes(data[:200])  # cut inside the header
    with pytest.raises(AdapterFileError, match="header length field says"):
        load_adapter(path)


def test_corrupt_header(saved):
    _, path = saved
    data = bytearray(path.read_bytes())
    data[8:9] = b"\xff"  # not UTF-8 / not JSON any more
    path.write_bytes(bytes(data))
    with pytest.raises(AdapterFileError, match="corrupt safetensors header"):
        read_adapter_config(path)


def test_header_with_impossible_tensor_entry(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    with pytest.raises(AdapterFileError, match=r"corrupt safetensors header \(tensor 'w'"):
        read_adapter_config(path)


def test_foreign_safetensors_files(tmp_path):
    save_file({"w": torch.zeros(2)}, tmp_path / "lora.safetensors")
    with pytest.raises(AdapterFileError, match=r"not an LLM Diff Adapter file \(format=missing\)"):
        load_adapter(tmp_path / "lora.safetensors")
    save_file({"w": torch.zeros(2)}, tmp_path / "ckpt.safetensors", metadata={"format": "pt"})
    with pytest.raises(AdapterFileError, match=r"not an LLM Diff Adapter file \(format=pt\)"):
        read_adapter_config(tmp_path / "ckpt.safetensors")


def test_newer_format_version_asks_to_update_the_pack(saved, tmp_path):
    _, path = saved
    newer = rewrite_metadata(path, tmp_path / "new.safetensors", format_version=str(FORMAT_VERSION + 1))
    with pytest.raises(AdapterFileError, match=f"format_version {FORMAT_VERSION + 1} .*update the pack"):
        load_adapter(newer)


def test_bad_config_in_metadata(saved, tmp_path):
    _, path = saved
    broken = rewrite_metadata(path, tmp_path / "b.safetensors", config="{not json")
    with pytest.raises(AdapterFileError, match="corrupt adapter config"):
        read_adapter_config(broken)
    data = json.loads(read_header_config(path))
    data["arch"]["widht"] = 3
    typo = rewrite_metadata(path, tmp_path / "t.safetensors", config=json.dumps(data))
    with pytest.raises(AdapterFileError, match=r"invalid adapter config: .*unknown keys \['widht'\]"):
        load_adapter(typo)


def read_header_config(path):
    with safe_open(path, "pt") as f:
        return f.metadata()["config"]


def test_weights_that_do_not_fit_the_config_are_named(saved, tmp_path):
    _, path = saved
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    del tensors["queries"]
    tensors["extra.weight"] = torch.zeros(3)
    save_file(tensors, tmp_path / "m.safetensors", metadata=metadata)
    with pytest.raises(AdapterFileError, match=r"missing tensors queries; unexpected tensors extra\.weight"):
        load_adapter(tmp_path / "m.safetensors")


# --------------------------------------------------------------------------- migrations


def write_v0_file(adapter, path):
    """A file as a hypothetical format 0 wrote it: `proj_in` was `input_proj`, arch.width was arch.dim."""
    config = adapter.config.to_dict()
    config["arch"]["dim"] = config["arch"].pop("width")
    tensors = {k.replace("proj_in.", "input_proj."): v.contiguous() for k, v in adapter.state_dict().items()}
    save_file(tensors, path, metadata={"format": FORMAT, "format_version": "0", "config": json.dumps(config)})
    return path


def migrate_v0_config(data):
    data = json.loads(json.dumps(data))
    data["arch"]["width"] = data["arch"].pop("dim")
    return data


def test_older_format_goes_through_the_migrations(tmp_path, monkeypatch):
    adapter = make_adapter()
    old = write_v0_file(adapter, tmp_path / "old.safetensors")
    monkeypatch.setitem(file_format.MIGRATIONS, 0, Migration(
        config=migrate_v0_config,
        tensors=lambda t: {k.replace("input_proj.", "proj_in."): v for k, v in t.items()},
    ))
    assert read_adapter_config(old) == adapter.config
    loaded = load_adapter(old)
    states, mask = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(states, mask).context, adapter(states, mask).context)


def test_older_format_without_a_migration_names_the_converter(tmp_path):
    old = write_v0_file(make_adapter(), tmp_path / "old.safetensors")
    assert 0 not in file_format.MIGRATIONS
    with pytest.raises(AdapterFileError, match=r"format_version 0 .*python -m adapter upgrade"):
        load_adapter(old)


# --------------------------------------------------------------------------- checks against the graph


def test_check_llm_matches_names_both_sides():
    config = make_config()
    check_llm_matches(config, LLM)  # the same LLM passes
    other = LLMInfo("LlamaForCausalLM", "llama", 48, 5, "tokfp1:" + "b" * 64, name="tiny-llama")
    with pytest.raises(AdapterMismatchError) as err:
        check_llm_matches(config, other)
    message = str(err.value)
    for part in ("tiny-qwen (Qwen2ForCausalLM, hidden 32, 3 layers)", "tiny-llama (LlamaForCausalLM, hidden 48, 5 layers)",
                 "hidden size 32 vs 48", "3 vs 5 layers", "tokenizer tokfp1:aaaa", "vs tokfp1:bbbb"):
        assert part in message


@pytest.mark.parametrize("field, value, expected", [
    ("hidden_size", 64, "hidden size 32 vs 64"),
    ("num_layers", 4, "3 vs 4 layers"),
    ("tokenizer_fingerprint", "tokfp1:other", "tokenizer tokfp1:"),
])
def test_check_llm_matches_each_mismatch_alone(field, value, expected):
    other = LLMInfo(**{**LLM.__dict__, field: value})
    with pytest.raises(AdapterMismatchError, match=expected):
        check_llm_matches(make_config(), other)


def test_architecture_name_alone_only_warns(caplog):
    renamed = LLMInfo(**{**LLM.__dict__, "architecture": "Qwen2Model"})
    with caplog.at_level(logging.WARNING):
        check_llm_matches(make_config(), renamed)
    assert "Qwen2Model" in caplog.text


def test_check_context_dim():
    sdxl = make_config("sdxl")
    check_context_dim(sdxl, 2048, 1280, "the connected CLIP")
    with pytest.raises(AdapterMismatchError) as err:
        check_context_dim(sdxl, 768, None, "the connected CLIP")
    assert str(err.value) == ("adapter makes 2048-wide SDXL context but the connected CLIP gives 768 (SD1.5): "
                              "use an adapter trained for sd15")
    with pytest.raises(AdapterMismatchError, match=r"gives 320 \(no known family\): .*--target custom --context-dim 320"):
        check_context_dim(make_config("sd15"), 320, None, "the MODEL")
    with pytest.raises(AdapterMismatchError, match="makes no pooled vector but the MODEL needs a 1280-wide one: .*sdxl"):
        check_context_dim(AdapterConfig(llm=LLM, target=make_target("custom", context_dim=2048)), 2048, 1280, "the MODEL")
    check_context_dim(make_config("sd15"), 768, None, "the connected CLIP")


# --------------------------------------------------------------------------- the optional `architecture` field

OLD_FILE = __import__("pathlib").Path(__file__).parent / "data" / "static_adapter_v1.safetensors"


def test_a_file_written_before_the_architecture_field_loads_unchanged(tmp_path):
    """The committed file predates `architecture`: it loads as our own adapter, and saving it again writes the same
    top-level config keys (no `architecture`), so files of ours stay readable by packs that never knew the field
    (the sections gain only the defaults of keys added since, as before)."""
    with safe_open(str(OLD_FILE), "pt") as f:
        stored = json.loads(f.metadata()["config"])
    assert "architecture" not in stored and "arch" in stored
    adapter = load_adapter(OLD_FILE)
    assert isinstance(adapter, LLMDiffAdapter) and adapter.config.architecture is None
    again = save_adapter(tmp_path / "again.safetensors", adapter)
    with safe_open(str(again), "pt") as f:
        written = json.loads(f.metadata()["config"])
    assert written.keys() == stored.keys()
    for section, values in stored.items():
        assert written[section] == values if not isinstance(values, dict) else values.items() <= written[section].items()


def test_a_bad_architecture_field_is_named(saved, tmp_path):
    _, path = saved
    data = json.loads(read_metadata(path)["config"])
    for bad, words in (({"kind": "unet", "sizes": {}, "text": {}}, "kind ella or rouwei"),
                       ({"kind": "ella", "sizes": {"wings": 2}, "text": {"encoder": "template", "max_length": 8}}, "wings")):
        broken = rewrite_metadata(path, tmp_path / "bad.safetensors", config=json.dumps({**data, "architecture": bad}))
        with pytest.raises(AdapterFileError, match=words):
            load_adapter(broken)


def read_metadata(path):
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())
