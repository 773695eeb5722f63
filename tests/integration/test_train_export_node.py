"""The trainer's export loads through the ComfyUI node (LLMDiffLoadAdapter.execute, in-process with real
ComfyUI modules), and the node's conditioning is exactly what the trainer trained on: train and inference
cannot drift."""
import shutil
from pathlib import Path

import pytest
import torch

from adapter import encode_prompts, load_adapter, load_llm
from devkit.tiny_models import make_tiny_llm
from devkit.train_runs import run_train, tiny_dataset, train_command
from training.conditioning import adapter_context

from devkit.comfy_pack import node_classes
from support.node_models import comfy_models  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export")
    proc = run_train(train_command("sd15", tiny_dataset(root / "data", count=2), root / "out", 2))
    assert proc.returncode == 0, proc.output
    return root / "out" / "adapter.safetensors"


def test_trainer_export_loads_in_the_node_and_conditions_like_training(exported, comfy_models):
    llm_dir, adapter_dir = comfy_models
    shutil.copy(exported, adapter_dir / "qwen-sd15-trained.safetensors")  # what the README tells users to do
    (llm_dir / "tiny-qwen2").symlink_to(make_tiny_llm(family="qwen2"))
    nodes = node_classes()

    handle = nodes["LLMDiffLoadAdapter"].execute("qwen-sd15-trained.safetensors").args[0]
    trained = load_adapter(exported)
    assert handle.module.config.training["steps"] == 2 and handle.module.config.training["weights"] == "ema"
    node_weights, file_weights = handle.module.state_dict(), trained.state_dict()
    assert node_weights.keys() == file_weights.keys()
    assert all(torch.equal(node_weights[k], file_weights[k]) for k in file_weights)

    # The node's conditioning for a prompt (and for the empty prompt that caption dropout trained) is the
    # trainer's own adapter_context on the same LLM states.
    llm = nodes["LLMDiffLoadLLM"].execute("tiny-qwen2", "auto").args[0]
    library_llm = load_llm(make_tiny_llm(family="qwen2"))
    for prompt in ("a red square, picture number 1", ""):
        [[context, extras]], _ = nodes["LLMDiffTextEncode"].execute(llm, handle, prompt).args
        with torch.no_grad():
            expected, pooled = adapter_context(trained.eval(), encode_prompts(library_llm, trained.config.template, [prompt]), None)
        assert pooled is None and "pooled_output" not in extras
        assert context.shape == (1, 77, 32)
        torch.testing.assert_close(context, expected, rtol=1e-5, atol=1e-6)
