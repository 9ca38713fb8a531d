"""The ``isa`` fixture of the kernel tests: the test runs once on each CPU kernel path of this machine."""
import pytest

from bitlab_fx.ops import cpu

from _kernel_paths import LIB, PATHS


@pytest.fixture(params=PATHS or ["none"])
def isa(request):
    if LIB is None:
        pytest.skip("no CPU kernel")
    name, _, batched = request.param.partition("+")
    cpu.set_isa(name)
    cpu.set_batched_min_m(1 if batched else 0)
    yield name
    cpu.set_isa(None)
    cpu.set_batched_min_m(0)
