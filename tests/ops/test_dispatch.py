"""Kernel dispatch: one module decides; the reference can be forced by environment or by call."""

import importlib
from pathlib import Path

import pytest
import torch

from hybridlm import ops
from hybridlm.ops import dispatch

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
SSM_OPS = ["selective_scan", "selective_state_update", "ssd_scan", "causal_conv1d", "causal_conv1d_update"]


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("HYBRIDLM_KERNELS", raising=False)


def test_cpu_uses_reference_ssm_ops_and_torch_sdpa():
    table = ops.kernel_table(CPU)
    for op in SSM_OPS + ["rms_norm", "gated_rms_norm"]:
        assert table[op] == "reference (PyTorch)", op
    assert table["attention"] == "torch SDPA"


def test_cuda_uses_fused_kernels_when_their_packages_import(monkeypatch):
    monkeypatch.setattr(dispatch, "available", lambda package: True)
    assert {dispatch.choose(op, CUDA) for op in SSM_OPS + ["attention"]} == {"fused"}
    assert ops.kernel_table(CUDA)["ssd_scan"] == "mamba_ssm"
    assert ops.kernel_table(CUDA)["causal_conv1d"] == "causal_conv1d"
    assert dispatch.choose("ssd_scan", CPU) == "reference"  # fused kernels need CUDA tensors
    monkeypatch.setattr(dispatch, "available", lambda package: package != "flash_attn")
    assert dispatch.choose("attention", CUDA) == "sdpa"


def test_environment_variable_forces_the_reference(monkeypatch):
    monkeypatch.setattr(dispatch, "available", lambda package: True)
    monkeypatch.setenv("HYBRIDLM_KERNELS", "reference")
    assert {dispatch.choose(op, CUDA) for op in SSM_OPS + ["attention"]} == {"reference"}
    assert set(ops.kernel_table(CPU).values()) == {"reference (PyTorch)"}


def test_set_kernels_forces_the_reference(monkeypatch):
    monkeypatch.setattr(dispatch, "available", lambda package: True)
    ops.set_kernels("reference")
    assert dispatch.choose("ssd_scan", CUDA) == "reference"
    assert ops.kernel_table(CPU)["attention"] == "reference (PyTorch)"
    ops.set_kernels("auto")
    assert dispatch.choose("ssd_scan", CUDA) == "fused"
    with pytest.raises(ValueError, match="kernels='fast'"):
        ops.set_kernels("fast")


def test_reference_kernels_context_restores_the_previous_mode():
    assert dispatch.choose("attention", CPU) == "sdpa"
    with ops.reference_kernels():
        assert dispatch.choose("attention", CPU) == "reference"
    assert dispatch.choose("attention", CPU) == "sdpa"


def test_forced_reference_routes_calls_to_the_reference_function(monkeypatch):
    attention_module = importlib.import_module("hybridlm.ops.attn")
    calls = []
    real = attention_module.attention_ref

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(attention_module, "attention_ref", spy)
    q = torch.randn(1, 4, 2, 8)
    ops.attention(q, q, q)
    assert calls == []  # SDPA by default on CPU
    monkeypatch.setenv("HYBRIDLM_KERNELS", "reference")
    ops.attention(q, q, q)
    assert calls == [1]


def test_reference_ops_turn_one_lever_off_and_restore_it(monkeypatch):
    monkeypatch.setattr(dispatch, "available", lambda package: True)
    with ops.reference_ops("swiglu"):
        assert dispatch.choose("swiglu", CUDA) == "reference"
        assert dispatch.choose("cross_entropy", CUDA) == "fused"  # only the named op
        assert ops.kernel_table(CUDA)["swiglu"] == "reference (PyTorch)"
    assert dispatch.choose("swiglu", CUDA) == "fused"
    assert ops.kernel_table(CUDA)["swiglu"] == "torch.compile"
    assert ops.kernel_table(CUDA)["cross_entropy"] == "Triton (hybridlm)"  # who wrote the kernels, not the package
    ops.set_kernels("auto", ["conv_ssd_scan"])
    try:
        assert dispatch.choose("conv_ssd_scan", CUDA) == "reference"
        assert ops.kernel_table(CUDA)["conv_ssd_scan"] == "unfused (the ops it is made of)"
        assert dispatch.choose("ssd_scan", CUDA) == "fused"  # the ops it is made of stay fused
    finally:
        ops.set_kernels("auto")
    with pytest.raises(ValueError, match="unknown op 'swiglue'"):
        ops.set_kernels("auto", ["swiglue"])


def test_a_composite_is_fused_only_when_every_package_it_needs_imports(monkeypatch):
    monkeypatch.setattr(dispatch, "available", lambda package: package != "causal_conv1d")
    assert dispatch.choose("ssd_scan", CUDA) == "fused"
    assert dispatch.choose("conv_ssd_scan", CUDA) == "reference"


def test_no_module_of_the_ops_package_is_named_like_an_op():
    """Importing ``hybridlm.ops.<name>`` would replace the function ``ops.<name>`` with the module (the Triton
    cross-entropy once did: the training loss became "'module' object is not callable")."""
    package_dir = Path(ops.__file__).parent
    assert not [name for name in ops.__all__ if (package_dir / f"{name}.py").exists()]
