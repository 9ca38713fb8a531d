"""Root pytest configuration: doctests of bitlab_fx run with the tests (see pyproject.toml)."""
import importlib.util

collect_ignore = ["examples", "benchmarks", "docs", "build"]
if importlib.util.find_spec("triton") is None:
    # the Triton kernels need triton to import; their tests say so and skip with a reason
    collect_ignore.append("bitlab_fx/ops/cuda")
