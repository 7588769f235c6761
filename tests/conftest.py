"""Shared fixtures: a factory for tiny model configs, a fixed seed, and the skip rule for GPU tests."""

from __future__ import annotations

import copy
import importlib.util
import os
from typing import Any

import pytest
import torch

# Without a GPU, Triton kernels run only under Triton's interpreter, and it must be chosen before triton is
# first imported (its library functions are decorated then): tests/ops/test_triton_interpreted.py
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hybridlm import ops
from hybridlm.config import ModelConfig
from hybridlm.model import HybridLM

# Small enough that a forward pass takes milliseconds on CPU, large enough that every layer kind
# has more than one head / group / expert: d_inner = 64 -> 4 Mamba-2 heads of 16 in 2 groups.
TINY_MODEL: dict[str, Any] = {
    "vocab_size": 61,  # not a multiple of 64: exercises vocab padding
    "d_model": 32,
    "pattern": "M*-",
    "mamba": {"version": 2, "d_state": 8, "d_conv": 4, "expand": 2, "head_dim": 16, "ngroups": 2, "chunk_size": 4},
    "attention": {"n_heads": 4, "n_kv_heads": 2},
    "mlp": {"d_ff": 48},
    "moe": {"n_experts": 4, "top_k": 2, "d_ff": 24},
}


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def make_tiny_config(**overrides: Any) -> ModelConfig:
    """A validated tiny ModelConfig; nested sections merge (``mamba={"version": 1}`` keeps the rest)."""
    return ModelConfig.from_dict(_merge(TINY_MODEL, overrides))


@pytest.fixture
def tiny_config():
    """Factory fixture: ``tiny_config(pattern="M-", mamba={"version": 1})`` -> ModelConfig."""
    return make_tiny_config


@pytest.fixture
def tiny_model(tiny_config):
    """Factory fixture: ``tiny_model(pattern="*-")`` -> a freshly initialised HybridLM in eval mode."""

    def build(**overrides: Any) -> HybridLM:
        return HybridLM(tiny_config(**overrides)).eval()

    return build


@pytest.fixture(autouse=True)
def _seed_and_auto_kernels():
    """Every test starts from the same seed and from automatic kernel dispatch."""
    torch.manual_seed(0)
    yield
    ops.set_kernels("auto")


def _imports(package: str) -> bool:
    if importlib.util.find_spec(package) is None:
        return False
    try:
        importlib.import_module(package)
    except Exception:
        return False
    return True


def gpu_kernels_available() -> bool:
    return torch.cuda.is_available() and _imports("mamba_ssm") and _imports("causal_conv1d")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if gpu_kernels_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA with mamba_ssm and causal_conv1d importable")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: a second thread costs far more than it saves. Modules
    that want it use it (``pytest.mark.usefixtures("one_thread")`` or an autouse wrapper in a conftest);
    the thread count is restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def load_benchmark():
    """Import a script of benchmarks/ (not a package) by file name: ``load_benchmark("recall")``."""
    from pathlib import Path

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
