"""benchmarks/profile_step.py's host mode: packages are attributed from file paths, and a CPU run prints a
self-time table whose shares add up (the GPU numbers come from the device, never from a test)."""

import re

import pytest
import yaml

BENCH_MODEL = {
    "vocab_size": 100,
    "d_model": 32,
    "pattern": "M-*-",
    "mamba": {"d_state": 8, "head_dim": 16, "chunk_size": 16},
    "attention": {"n_heads": 2},
    "mlp": {"d_ff": 64},
}


@pytest.fixture
def profile_step(load_benchmark):
    return load_benchmark("profile_step")


@pytest.mark.parametrize(
    "filename, package",
    [
        ("~", "built-in"),
        ("/usr/lib/python3.12/site-packages/triton/runtime/autotuner.py", "triton"),
        ("/tmp/site/mamba_ssm/ops/triton/ssd_combined.py", "mamba_ssm"),  # not triton: the package comes first
        ("/venv/lib/python3.11/site-packages/torch/autograd/function.py", "torch"),
        ("/work/main/hybridlm/model/block.py", "hybridlm"),
        ("/usr/lib/python3.11/functools.py", "other"),
    ],
)
def test_functions_are_attributed_to_their_package(profile_step, filename, package):
    assert profile_step.package_of(filename) == package


def test_host_mode_on_cpu_prints_shares_that_add_up(profile_step, tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"model": BENCH_MODEL}))
    out = tmp_path / "prof"
    argv = [str(config), "--device", "cpu", "--shape", "2x32", "--warmup", "1", "--steps", "2", "--host"]
    profile_step.main(argv + ["--out", str(out), "--top", "5"])
    text = capsys.readouterr().out
    assert re.search(r"issuing a step takes [\d.]+ ms of host time, the step [\d.]+ ms of wall time", text)
    shares = [float(x) for x in re.findall(r"^  \S+ +[\d.]+ ms +([\d.]+)%$", text, flags=re.M)]
    assert "hybridlm" in text and sum(shares) == pytest.approx(100, abs=0.5)
    assert (out / "hybridlm-2x32.host.pstats").is_file()


@pytest.mark.parametrize(
    "kernel, category",
    [  # names from a profile of the 500M config's training step on an H200
        ("_layer_norm_bwd_kernel", "norm"),  # mamba_ssm's gated RMSNorm
        ("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0", "norm"),  # Inductor's add + RMSNorm forward
        ("triton_per_fused__to_copy_add_div_expand_mul_pow_sum_0", "norm"),  # ... and backward, not a copy
        ("triton_poi_fused_mul_silu_silu_backward_0", "element-wise"),
        ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", "gemm"),
        ("_chunk_scan_bwd_ddAcs_stable_kernel", "ssd scan"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x64", "attention"),
        (
            "void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<direct_copy_kernel",
            "copy/cast",
        ),
        ("triton_red_fused__log_softmax__to_copy_prepare_softmax_online_0", "loss"),
    ],
)
def test_kernels_fall_into_their_category(profile_step, kernel, category):
    assert profile_step.category(kernel) == category


def test_record_function_ranges_on_the_device_are_not_counted_as_kernels(profile_step):
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent

    def event(name, device_type, annotation=False):
        return FunctionEvent(0, name, 0, 0, 10, device_type=device_type, is_user_annotation=annotation)

    events = [
        event("aten::mm", DeviceType.CPU),
        event("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", DeviceType.CUDA),
        # the optimizer's record_function and a torch.compile'd call, as they appear on the GPU's timeline
        event("Optimizer.step#AdamW.step", DeviceType.CUDA, annotation=True),
        event("## Call CompiledFxGraph fxjikles2upwjnzm4pobexddx2g ##", DeviceType.CUDA, annotation=True),
    ]
    kept = profile_step.kernel_events(events)
    assert [e.name for e in kept] == ["nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT"]


def test_graph_is_refused_where_the_step_has_no_graphs(profile_step, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"model": BENCH_MODEL}))
    with pytest.raises(SystemExit, match="--graph: hybridlm on cpu has no graphed training step"):
        profile_step.main([str(config), "--device", "cpu", "--shape", "2x32", "--graph", "--out", str(tmp_path)])
