"""Model folder registration (extra_model_paths.yaml included), LLM listing and the path resolver."""
import os

import pytest

from test_nodes_pack import load_pack


@pytest.fixture
def paths(tmp_path, monkeypatch):
    """The pack's paths module over a private folder registry: models/ in tmp_path plus one extra root."""
    pack = load_pack()
    import folder_paths

    monkeypatch.setattr(folder_paths, "folder_names_and_paths", {})
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    monkeypatch.setattr(folder_paths, "models_dir", str(tmp_path / "models"))
    # extra_model_paths.yaml is applied before custom nodes load: it registers the folder type first.
    folder_paths.add_model_folder_path("LLM", str(tmp_path / "extra_llm"))
    pack.nodes.paths.register_model_folders()
    return pack.nodes.paths


def make_llm(root, name, complete=True):
    folder = root / name
    folder.mkdir(parents=True)
    if complete:
        (folder / "config.json").write_text("{}")
    return folder


def test_registration_keeps_extra_roots_and_sets_filters(paths, tmp_path):
    import folder_paths

    llm_roots, llm_ext = folder_paths.folder_names_and_paths["LLM"]
    assert llm_roots == [str(tmp_path / "extra_llm"), str(tmp_path / "models" / "LLM")]
    assert llm_ext == {"folder"}
    adapter_roots, adapter_ext = folder_paths.folder_names_and_paths["llm_adapters"]
    assert adapter_roots == [str(tmp_path / "models" / "llm_adapters")]
    assert adapter_ext == {".safetensors"}
    paths.register_model_folders()  # idempotent: no duplicate roots
    assert folder_paths.get_folder_paths("LLM") == llm_roots


def test_adapter_list_shows_only_safetensors(paths, tmp_path):
    root = tmp_path / "models" / "llm_adapters"
    root.mkdir(parents=True)
    for name in ("a.safetensors", "b.ckpt", "c.pt", "notes.txt"):
        (root / name).write_bytes(b"x")
    assert paths.list_adapters() == ["a.safetensors"]


def test_llm_list_covers_both_roots_nested_and_half_copied(paths, tmp_path):
    make_llm(tmp_path / "models" / "LLM", "qwen")
    make_llm(tmp_path / "extra_llm", "Org/llama")  # grouped by organisation
    make_llm(tmp_path / "models" / "LLM", "half", complete=False)  # listed, so loading can say what is missing
    (tmp_path / "models" / "LLM" / ".cache").mkdir()
    assert paths.list_llms() == ["Org/llama", "half", "qwen"]


def test_resolver_finds_models_in_any_root(paths, tmp_path):
    folder = make_llm(tmp_path / "extra_llm", "qwen")
    assert paths.resolve_in_folder("LLM", "qwen", want_dir=True) == str(folder)


@pytest.mark.parametrize("name", ["../outside", "qwen/../../outside", "/etc", "..", ".", "..\\outside"])
def test_resolver_refuses_paths_that_escape(paths, tmp_path, name):
    make_llm(tmp_path / "models", "outside")  # exists, so only the check can stop it
    with pytest.raises(ValueError, match="outside models/LLM"):
        paths.resolve_in_folder("LLM", name, want_dir=True)


def test_resolver_says_where_it_looked(paths, tmp_path):
    with pytest.raises(FileNotFoundError, match="extra_llm") as err:
        paths.resolve_in_folder("LLM", "missing-model", want_dir=True)
    assert "missing-model" in str(err.value) and str(tmp_path / "models" / "LLM") in str(err.value)
    with pytest.raises(FileNotFoundError, match="llm_adapters"):
        paths.resolve_in_folder("llm_adapters", "missing.safetensors", want_dir=False)


def test_resolver_follows_symlinks_inside_a_root(paths, tmp_path):
    store = make_llm(tmp_path / "store", "big-model")
    (tmp_path / "models" / "LLM").mkdir(parents=True)
    os.symlink(store, tmp_path / "models" / "LLM" / "linked")
    assert paths.resolve_in_folder("LLM", "linked", want_dir=True).endswith("linked")


def test_loaders_validate_their_file_before_anything_runs(paths, tmp_path):
    """validate_inputs: ComfyUI calls it for every node before executing, so all missing files of a graph
    are reported together; each message names the name, the folders searched and what to do."""
    import sys

    nodes = sys.modules[paths.__name__.rsplit(".", 1)[0]]
    load_llm, load_adapter = nodes.load_llm.LLMDiffLoadLLM, nodes.load_adapter.LLMDiffLoadAdapter
    make_llm(tmp_path / "models" / "LLM", "present")
    (tmp_path / "models" / "llm_adapters").mkdir(parents=True)
    (tmp_path / "models" / "llm_adapters" / "present.safetensors").write_bytes(b"")

    assert load_llm.validate_inputs(llm_name="present") is True
    assert load_adapter.validate_inputs(adapter_name="present.safetensors") is True
    assert load_llm.validate_inputs() is True and load_adapter.validate_inputs() is True  # fed by a link
    missing_llm = load_llm.validate_inputs(llm_name="Qwen2.5-1.5B-Instruct")
    assert "'Qwen2.5-1.5B-Instruct' was not found" in missing_llm and str(tmp_path / "models" / "LLM") in missing_llm
    assert "Copy it there" in missing_llm
    missing_adapter = load_adapter.validate_inputs(adapter_name="other.safetensors")
    assert "'other.safetensors' was not found" in missing_adapter and str(tmp_path / "models" / "llm_adapters") in missing_adapter
    assert "points outside models/" in load_adapter.validate_inputs(adapter_name="/etc/passwd")
