"""The CUDA-graphed training step. On CPU ``capture=False`` runs the same procedure eagerly over the same
static buffers, which pins the bookkeeping: gradients reach ``.grad`` like the model's own, accumulate
across micro-batches, are not overwritten by the next replay, and only training calls of the captured
shape replay. GPU tests (marked) compare the captured graphs with the eager model, and whole training
runs with ``train.cuda_graph`` on and off."""

from __future__ import annotations

import pytest
import torch

from hybridlm.config import ConfigError, ModelConfig, TrainConfig, load_run_config
from hybridlm.model import HybridLM
from hybridlm.train.graphed_step import GraphedTraining, cast_once_names, installed_graph, resolve_cuda_graph
from hybridlm.train.metrics import read_metrics
from hybridlm.train.trainer import run_train

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = {
    "mamba2_hybrid": {"pattern": "M*-M-"},
    "mamba1_hybrid": {"pattern": "M*-", "mamba": {"version": 1}},
    "attention_window_partial_rope": {"pattern": "*-*-", "attention": {"window": 3, "rope_fraction": 0.5}},
}


def twin_models(config: ModelConfig, device: str = "cpu") -> tuple[HybridLM, HybridLM]:
    """Two identical models in training mode: one to graph, one to run as written."""
    model = HybridLM(config).to(device).train()
    twin = HybridLM(config).to(device).train()
    twin.load_state_dict(model.state_dict())
    return model, twin


def grads(model: HybridLM) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def lm_batch(shape=(2, 8), vocab: int = 61, device: str = "cpu") -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, shape, device=device)
    return {"input_ids": ids, "labels": ids}


def assert_same_grads(got: dict, expected: dict, rel: float = 1e-5) -> None:
    assert got.keys() == expected.keys()
    for name, g in expected.items():
        err = (got[name] - g).abs().max().item()
        assert err <= rel * g.abs().max().item() + 1e-7, f"{name}: max error {err:.3g}"


@pytest.mark.parametrize("overrides", MODELS.values(), ids=MODELS.keys())
def test_accumulated_gradients_equal_the_models_own(tiny_config, overrides):
    model, twin = twin_models(tiny_config(**overrides))
    GraphedTraining(model, capture=False)
    for mb in (lm_batch(), lm_batch()):  # gradient accumulation: two backward passes into .grad
        (model(**mb).loss / 2).backward()
        (twin(**mb).loss / 2).backward()
    assert_same_grads(grads(model), grads(twin))


@pytest.mark.parametrize("overrides", MODELS.values(), ids=MODELS.keys())
def test_weights_cast_once_give_autocasts_numbers(tiny_config, overrides):
    """Under autocast the step casts the linear weights itself, all at once: the loss and every gradient
    must be autocast's own, bit for bit (the same roundings each way), over two accumulated micro-batches."""
    model, twin = twin_models(tiny_config(**overrides))
    graphed = GraphedTraining(model, capture=False)
    for mb in (lm_batch(), lm_batch()):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, expected = model(**mb).loss, twin(**mb).loss
        assert torch.equal(loss, expected)
        loss.backward()
        expected.backward()
    assert graphed.captured.cast_names  # the batched casts ran
    got, want = grads(model), grads(twin)
    assert got.keys() == want.keys()
    for name, g in want.items():
        assert torch.equal(got[name], g), name


def test_which_weights_are_cast_once(tiny_config):
    # Mamba-1's dt_proj weight is handed to kernels by its block and the tied lm_head is the embedding's table
    # (read in fp32): both keep autocast's own casts; biases and norms are never cast once.
    model = HybridLM(tiny_config(pattern="M*-", mamba={"version": 1}, tie_embeddings=True))
    trainable = dict(model.named_parameters())
    chosen = cast_once_names(model, trainable, torch.bfloat16)
    linear = ("in_proj", "x_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")
    expected = [n for n in trainable if n.endswith(tuple(f"{m}.weight" for m in (*linear, "down_proj")))]
    assert chosen == expected and expected
    assert cast_once_names(model, trainable, None) == []  # no autocast: nothing to cast
    del trainable[expected[0]]  # frozen: not among the trainable ones
    assert cast_once_names(model, trainable, torch.bfloat16) == expected[1:]


def test_packed_rows_checkpointing_and_chunked_loss_replay_too(tiny_config):
    model, twin = twin_models(tiny_config(pattern="M*-M-"))
    for m in (model, twin):
        m.checkpoint_every, m.loss_chunk_tokens = 1, 5
    GraphedTraining(model, capture=False)
    mb = {**lm_batch(), "doc_ids": torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2]] * 2)}
    loss, expected = model(**mb).loss, twin(**mb).loss
    torch.testing.assert_close(loss, expected)
    loss.backward()
    expected.backward()
    assert_same_grads(grads(model), grads(twin))
    assert installed_graph(model).captured.inputs["doc_ids"] is not None


def test_optimizer_steps_track_the_eager_model(tiny_config):
    # the replayed step reads the parameters in place: the optimizer's updates must show in the next step
    model, twin = twin_models(tiny_config(pattern="M*-M-"))
    GraphedTraining(model, capture=False)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (model, twin)]
    losses: dict[str, list[float]] = {"graphed": [], "eager": []}
    mb = lm_batch()  # one batch, learnt step by step: the loss must fall
    for _ in range(4):
        for name, m, opt in zip(losses, (model, twin), optimizers, strict=True):
            loss = m(**mb).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[name].append(loss.item())
    assert losses["graphed"] == pytest.approx(losses["eager"], rel=1e-5)
    assert losses["graphed"][-1] < losses["graphed"][0]


def test_grads_do_not_alias_the_static_buffers(tiny_config):
    # Were .grad a view of a static gradient buffer, the next micro-batch's backward would overwrite it.
    model, _ = twin_models(tiny_config())
    graphed = GraphedTraining(model, capture=False)
    model(**lm_batch()).loss.backward()
    first = {n: p.grad for n, p in model.named_parameters()}  # the tensors themselves, not copies
    kept = {n: g.clone() for n, g in first.items()}
    static = {g.data_ptr() for g in graphed.captured.grads if g is not None}
    assert not static & {g.data_ptr() for g in first.values()}
    model.zero_grad(set_to_none=True)
    model(**lm_batch()).loss.backward()  # writes new gradients into the static buffers
    assert any(not torch.equal(p.grad, kept[n]) for n, p in model.named_parameters())
    for name, g in first.items():
        assert torch.equal(g, kept[name]), name


def test_only_training_calls_of_the_captured_shape_replay(tiny_config):
    model, _ = twin_models(tiny_config())
    graphed = GraphedTraining(model, capture=False)
    mb = lm_batch()
    with torch.no_grad():
        assert model(**mb).logits is not None  # no gradient: the model as written
    assert model(mb["input_ids"]).logits is not None  # no labels
    model.eval()
    assert model(**mb).logits is not None
    assert graphed.captured is None
    model.train()
    out = model(**mb)
    assert out.logits is None and graphed.captured.inputs["input_ids"].shape == (2, 8)
    out.loss.backward()
    other = model(**lm_batch((1, 8)))
    assert other.logits is not None  # another shape runs eagerly and keeps the captured one
    assert graphed.captured.inputs["input_ids"].shape == (2, 8)


def test_a_second_forward_before_backward_is_refused(tiny_config):
    model, _ = twin_models(tiny_config())
    GraphedTraining(model, capture=False)
    model(**lm_batch())
    with pytest.raises(RuntimeError, match="before the previous one's backward"):
        model(**lm_batch())


def test_remove_restores_the_models_forward(tiny_config):
    model, _ = twin_models(tiny_config())
    graphed = GraphedTraining(model, capture=False)
    assert installed_graph(model) is graphed
    graphed.remove()
    assert installed_graph(model) is None
    assert model(**lm_batch()).logits is not None


def test_cuda_graph_setting(tiny_config):
    cfg, cpu = tiny_config(), torch.device("cpu")
    assert resolve_cuda_graph(TrainConfig(cuda_graph="auto"), cfg, cpu) is False
    assert resolve_cuda_graph(TrainConfig(cuda_graph=False), cfg, cpu) is False
    with pytest.raises(ConfigError, match=r"train.cuda_graph=true.*not on a CUDA device"):
        resolve_cuda_graph(TrainConfig(cuda_graph=True), cfg, cpu)
    with pytest.raises(ConfigError, match=r"train.cuda_graph=true.*zero_stage=3"):
        load_run_config(None, ["train.cuda_graph=true", "train.zero_stage=3"])
    with pytest.raises(ConfigError, match=r"train.cuda_graph=true.*MoE"):
        load_run_config(None, ["train.cuda_graph=true", "model.pattern=M*E"])
    with pytest.raises(ConfigError, match=r"train.cuda_graph='sometimes'"):
        load_run_config(None, ["train.cuda_graph=sometimes"])
    assert load_run_config(None, ["train.cuda_graph=false"]).train.cuda_graph is False


# ------------------------------------------------------------------------------------------------
# GPU: the captured graphs


# Kernel-sized widths (the Triton kernels want head_dim and chunk_size of 16 and up)
GPU_SIZES = {
    "vocab_size": 256,
    "d_model": 128,
    "mamba": {"d_state": 16, "head_dim": 32, "chunk_size": 32},
    "mlp": {"d_ff": 0},  # 0: the default width
}


@pytest.mark.gpu
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
@pytest.mark.parametrize("version", [1, 2])
def test_captured_step_gives_the_eager_loss_and_gradients(tiny_config, version, autocast):
    """Two micro-batches (accumulated) then an AdamW step, three times: every loss and the final
    gradients of the graphed model against the same model run eagerly on the same fused kernels.
    Tolerance: relative 1e-4 of each gradient's largest entry in fp32, 1e-2 under bf16 autocast
    (the kernels are the same; reductions with atomics may add in another order)."""
    torch.manual_seed(0)
    config = tiny_config(**{**GPU_SIZES, "pattern": "M*-M*-", "mamba": {**GPU_SIZES["mamba"], "version": version}})
    model, twin = twin_models(config, "cuda")
    graphed = GraphedTraining(model)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True) for m in (model, twin)]
    rel = 1e-2 if autocast else 1e-4
    for _ in range(3):
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        micro_batches = [lm_batch((2, 128), 256, "cuda") for _ in range(2)]
        losses = []
        for m in (model, twin):
            step = []
            for mb in micro_batches:
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                    loss = m(**mb).loss
                (loss / 2).backward()
                step.append(loss.detach())
            losses.append(torch.stack(step))
        torch.testing.assert_close(losses[0], losses[1], atol=0, rtol=rel)
        assert_same_grads(grads(model), grads(twin), rel)
        for opt in optimizers:
            opt.step()
    assert graphed.captured.graphs is not None  # it replayed graphs, not the eager fallback


@pytest.mark.gpu
@pytest.mark.parametrize("stage", [0, 2])
def test_training_runs_with_and_without_cuda_graphs_agree(run_args, tmp_path, stage):
    """The trainer end to end under DeepSpeed on one GPU (ZeRO-2 reduces gradients in hooks that
    the replayed backward must still fire): per-step losses with and without the graphs."""
    common = ["model.pattern=M-*-M-", "train.max_steps=6", "train.grad_accum=2", f"train.zero_stage={stage}"]
    run_train(None, run_args(*common, "train.cuda_graph=true", out="graphed"))
    run_train(None, run_args(*common, "train.cuda_graph=false", out="eager"))
    graphed = [r["loss"] for r in read_metrics(tmp_path / "graphed") if "loss" in r]
    eager = [r["loss"] for r in read_metrics(tmp_path / "eager") if "loss" in r]
    assert len(graphed) == 6
    assert graphed == pytest.approx(eager, rel=1e-2)
    assert graphed[-1] < graphed[0]
