"""The teacher's logits kept on disk, so repeated epochs over the same batches run the float teacher once.

One file per distinct batch (named by a hash of its token ids), logits stored in ``dtype`` (bf16 by default:
half the bytes of fp32; the softmax of bf16 logits differs from fp32 by well under the KL being trained).
Size: ``batch * seq * vocab * 2`` bytes per batch, e.g. 4 x 256 x 49152 x 2 = 100 MB for SmolLM2: cache
only what fits the disk.

>>> import tempfile, torch
>>> cache = TeacherCache(tempfile.mkdtemp())
>>> ids = torch.tensor([[1, 2, 3]])
>>> calls = []
>>> first = cache.logits(ids, lambda: calls.append(1) or torch.ones(1, 3, 5))
>>> again = cache.logits(ids, lambda: calls.append(1) or torch.ones(1, 3, 5))
>>> len(calls), torch.equal(first, again)
(1, True)
"""
from __future__ import annotations

import hashlib
import os
from typing import Callable

import torch


class TeacherCache:
    """``logits(ids, compute)``: the stored logits of ``ids``, or ``compute()`` stored and returned."""

    def __init__(self, directory: str, dtype: torch.dtype = torch.bfloat16):
        self.directory, self.dtype = directory, dtype
        os.makedirs(directory, exist_ok=True)

    def path(self, ids: torch.Tensor) -> str:
        ids = ids.detach().to("cpu", torch.int64).contiguous()
        digest = hashlib.sha1(repr(tuple(ids.shape)).encode() + ids.numpy().tobytes()).hexdigest()
        return os.path.join(self.directory, f"{digest}.pt")

    def logits(self, ids: torch.Tensor, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        path = self.path(ids)
        if os.path.exists(path):
            return torch.load(path, map_location=ids.device).float()
        logits = compute().detach()
        tmp = f"{path}.tmp{os.getpid()}"
        torch.save(logits.to("cpu", self.dtype), tmp)
        os.replace(tmp, path)
        return logits.to(self.dtype).float()  # the same values a later epoch reads back
