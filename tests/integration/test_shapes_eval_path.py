"""The adapter's evaluation path is exact: fed the teacher's own contexts, it reproduces the teacher's scores.

The shapes benchmark compares an adapter with the teacher through two routes: the teacher's contexts go
straight into the sampler (`evaluate.teacher_conditioning`), an adapter's through the trainer's own code
(`evaluate.adapter_conditioning` -> `training.conditioning.adapter_context_at`: the LLM, the template, the adapter's
forward, its empty-prompt negative). If that route differed in anything but the context (noise, guidance,
negative, batching), every adapter-minus-teacher figure and the recovered gain R would carry the difference.
`TeacherReplay` is a module with the adapter's interface that answers each prompt's LLM states with the
teacher's context for that prompt; through the adapter's route it must give the teacher's images, checks and
epsilon-MSE bit for bit, and R = 1.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from adapter import AdapterOutput, TemplateConfig, encode_prompts, record_chat_template
from bench.shapes import evaluate as ev
from bench.shapes.scenes import heldout_prompts

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "shapes"


class TeacherReplay(nn.Module):
    """Adapter interface (config.template, timestep_aware, forward(states, mask, t) -> AdapterOutput) whose context
    for a prompt is the teacher's own: each row of LLM states is matched to the known prompt with the nearest states."""

    timestep_aware = False

    def __init__(self, base, llm, prompts: list[str]):
        super().__init__()
        self.config = type("Config", (), {"template": record_chat_template(TemplateConfig(), llm.tokenizer)})()
        distinct = sorted(set(prompts) | {""})
        encoded = encode_prompts(llm, self.config.template, distinct)
        self.states = [encoded.hidden_states[i, :, : int(encoded.attention_mask[i].sum())] for i in range(len(distinct))]
        self.contexts, _ = base.encode_clip(distinct, "cpu")

    def forward(self, hidden_states, attention_mask, timesteps=None):
        rows = []
        for states, mask in zip(hidden_states, attention_mask):
            n = int(mask.sum())
            errors = [float((states[:, :n] - s).abs().max()) if s.shape[1] == n else float("inf") for s in self.states]
            best = int(np.argmin(errors))
            assert errors[best] < 1e-4, "a prompt the replay does not know"
            rows.append(self.contexts[best])
        return AdapterOutput(torch.stack(rows), None)


@pytest.fixture(scope="module")
def shapes():
    if not (ASSETS / "manifest.json").is_file():
        pytest.skip("assets/shapes is missing (make shapes-assets)")
    torch.set_num_threads(1)
    return ev.load_base_and_llm(ASSETS)


def test_teacher_contexts_through_the_adapter_path_reproduce_the_teacher_exactly(shapes):
    base, llm = shapes
    prompts = heldout_prompts(6)
    triplets = ev.make_triplets(base, n=12)
    replay = TeacherReplay(base, llm, prompts + triplets.captions)
    teacher, through_adapter = ev.teacher_conditioning(base), ev.adapter_conditioning(replay, llm)

    images_t, checks_t = ev.alignment(base, teacher, prompts, steps=4, guidance=4.0, seed=3, batch_size=4)
    images_a, checks_a = ev.alignment(base, through_adapter, prompts, steps=4, guidance=4.0, seed=3, batch_size=4)
    assert np.array_equal(images_t, images_a) and checks_t == checks_a

    loss_t = ev.eps_mse(base, teacher, triplets)
    loss_a = ev.eps_mse(base, through_adapter, triplets, batch_size=5)  # other batching, same numbers
    np.testing.assert_allclose(loss_a, loss_t, rtol=1e-5, atol=1e-7)
    loss_empty = ev.eps_mse(base, ev.empty_conditioning(base), triplets)
    assert ev.recovered_gain(float(loss_a.mean()), float(loss_t.mean()), float(loss_empty.mean())) == pytest.approx(1.0, abs=1e-3)


def test_recovered_gain_is_the_share_of_the_teachers_gain():
    assert ev.recovered_gain(0.02094, 0.01915, 0.02094) == 0.0
    assert ev.recovered_gain(0.01915, 0.01915, 0.02094) == 1.0
    assert ev.recovered_gain(0.02004, 0.01915, 0.02094) == pytest.approx(0.5028, abs=1e-4)
    assert ev.recovered_gain(0.0215, 0.01915, 0.02094) < 0  # worse than saying nothing
    assert math.isnan(ev.recovered_gain(0.02, 0.021, 0.02))  # a teacher no better than saying nothing: undefined
