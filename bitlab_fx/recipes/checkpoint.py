"""Checkpoints of a training run: written atomically, so a run killed while saving keeps its previous one.

>>> import os, tempfile
>>> path = os.path.join(tempfile.mkdtemp(), "run.pt")
>>> save_checkpoint(path, {"step": 3})
>>> load_checkpoint(path)["step"], load_checkpoint(path + ".missing")
(3, None)
"""
from __future__ import annotations

import os
from typing import Optional

import torch


def save_checkpoint(path: str, state: dict) -> None:
    """``torch.save(state)`` to ``path`` through a temporary file in the same folder and an atomic rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Optional[str]) -> Optional[dict]:
    """The state saved at ``path``, or None when there is none (a fresh run)."""
    if not path or not os.path.exists(path):
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def rng_state() -> dict:
    """The random generators a training step may draw from (dropout, sampling): CPU, and CUDA when present."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
