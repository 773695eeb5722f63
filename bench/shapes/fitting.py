"""The step and the summary shared by the tiny models' training loops (tiny_lm.py, tiny_base.py)."""
from __future__ import annotations

from typing import Iterable, Optional

import torch


def optimizer_step(loss: torch.Tensor, optimizer, schedule, clip_params: Optional[Iterable[torch.Tensor]] = None) -> float:
    """Backward, optional grad-norm clipping at 1.0, optimizer and LR-schedule step; returns the loss value."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_params is not None:
        torch.nn.utils.clip_grad_norm_(clip_params, 1.0)
    optimizer.step()
    schedule.step()
    return loss.item()


def loss_summary(losses: list[float], final_key: str) -> dict[str, float]:
    """First loss and the mean of the last tenth of the run (a less noisy 'final' than the last step)."""
    tail = losses[-max(1, len(losses) // 10):]
    return {"first_loss": losses[0], final_key: sum(tail) / len(tail)}
