"""Root pytest configuration: doctests of bitlab_fx run with the tests (see pyproject.toml)."""
import importlib.util

import pytest
import torch

collect_ignore = ["examples", "benchmarks", "docs", "build"]
if importlib.util.find_spec("triton") is None:
    # the Triton kernels need triton to import; their tests say so and skip with a reason
    collect_ignore.append("bitlab_fx/ops/cuda")


@pytest.fixture(autouse=True)
def _seed_torch(request):
    """Every test starts from a known torch seed: pytest-randomly's seed of this run (printed in the header;
    rerun a run with ``--randomly-seed=N``, or use ``-p no:randomly`` for seed 0 in file order)."""
    seed = getattr(request.config.option, "randomly_seed", 0)
    torch.manual_seed(seed if isinstance(seed, int) else 0)


def pytest_terminal_summary(terminalreporter, config):
    """The seed of this run, even under ``-q`` (which hides pytest-randomly's header): a failure reproduces
    with ``--randomly-seed=N``."""
    seed = getattr(config.option, "randomly_seed", None)
    if isinstance(seed, int):
        terminalreporter.write_line(f"bitlab_fx tests: --randomly-seed={seed}")
