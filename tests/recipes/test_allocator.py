"""bfx.recipes.retain_freed_memory: glibc's mallopt settings for CPU training steps."""
import platform
import subprocess
import sys

import pytest

import bitlab_fx as bfx
from bitlab_fx.recipes import allocator


def test_it_applies_on_glibc_and_the_process_keeps_working():
    """In a fresh process (the settings are process-wide): applied on glibc Linux, then big tensors still allocate,
    compute and free correctly."""
    code = ("import torch, bitlab_fx as bfx; ok = bfx.recipes.retain_freed_memory(); "
            "xs = [torch.ones(64 << 20 >> 2) * i for i in range(4)]; del xs; "
            "y = torch.full((1 << 24,), 2.0).sum().item(); print(ok, y)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    applied, total = out.stdout.split()
    assert float(total) == 2.0 * (1 << 24)
    assert applied == str(platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")


def test_elsewhere_it_changes_nothing(monkeypatch):
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    assert bfx.recipes.retain_freed_memory() is False


@pytest.mark.parametrize("kwargs", [{"mmap_threshold_mb": 0}, {"mmap_threshold_mb": 4096}, {"top_pad_mb": -1}])
def test_out_of_range_sizes_are_config_errors(kwargs):
    with pytest.raises(bfx.ConfigError, match="retain_freed_memory"):
        bfx.recipes.retain_freed_memory(**kwargs)
