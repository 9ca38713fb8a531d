import getpass
import os
import tempfile

import pytest
import torch

from _helpers import SmallNet

# torch.compile's kernel cache (/tmp/torchinductor_<user>) is shared by every run on a machine, and kernels cached by
# a run at the CPU's best instruction set crashed a later run under ATEN_CPU_CAPABILITY=avx2 (segfault in a compiled
# graph, torch 2.13 on an AVX-512 Xeon): a run that caps the instruction set gets a cache of its own.
if os.environ.get("ATEN_CPU_CAPABILITY") and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_{os.environ['ATEN_CPU_CAPABILITY']}")


@pytest.fixture
def small_net():
    torch.manual_seed(0)
    return SmallNet()
