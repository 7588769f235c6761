"""Fine-tuning through ``train.py``'s entry point: LoRA from a hybridlm checkpoint on the reverse-words set (only
adapters train, the merged export equals the adapted model, the response loss falls, resume), starting from a
Hugging Face checkpoint (step-0 loss equals transformers', ``convert to-hf`` round trip), and the refusals."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from hybridlm.cli import main as hybridlm_cli
from hybridlm.config import ConfigError, FinetuneConfig, LoRAConfig, ModelConfig
from hybridlm.data import DataError, PackedLoader, read_manifest
from hybridlm.data.tokenizer import train_bpe
from hybridlm.model import HybridLM
from hybridlm.train import run_train
from hybridlm.train.init_from import reconcile_model, resolve_init_from
from hybridlm.train.lora import apply_finetune
from hybridlm.train.metrics import read_metrics

REVERSE_WORDS = Path(__file__).parents[2] / "data" / "examples" / "reverse_words.jsonl"
SEQ_LEN = 256  # a multiple of the default model's mamba.chunk_size, which the config is validated against
TARGETS = "[q_proj,k_proj,v_proj,o_proj,in_proj,out_proj,gate_proj,up_proj,down_proj]"
TINY = {"d_model": 64, "pattern": "M*-", "mamba": {"head_dim": 16, "d_state": 16, "chunk_size": 32}}
FINETUNE = [
    f"data.sources=[{{path: {REVERSE_WORDS}, format: instruct}}]",
    "data.val_fraction=0.1",
    f"train.seq_len={SEQ_LEN}",
    "train.micro_batch_size=4",
    "train.warmup_steps=3",
    "train.weight_decay=0",
    "train.log_every=5",
    "train.eval_batches=8",
]
LORA = ["finetune.lora.r=16", "finetune.lora.alpha=64", f"finetune.lora.target_modules={TARGETS}"]

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models run single-threaded


def reverse_words_texts() -> list[str]:
    records = [json.loads(line) for line in REVERSE_WORDS.read_text().splitlines()]
    turns = [r.get("messages") or [{"content": r["prompt"]}, {"content": r["response"]}] for r in records]
    return [m["content"] for conversation in turns for m in conversation]


def save_tokenizer(out: Path, vocab_size: int = 320) -> Path:
    """A BPE trained on the reverse-words text, saved like a checkpoint's tokenizer."""
    train_bpe(reverse_words_texts(), vocab_size).save_pretrained(str(out))
    return out


def save_base_model(out: Path, vocab_size: int, tokenizer: bool = True, **model) -> Path:
    torch.manual_seed(0)
    HybridLM(ModelConfig.from_dict({**TINY, "vocab_size": vocab_size, **model})).save_pretrained(out)
    if tokenizer:
        save_tokenizer(out)
    return out


def response_loss(model: HybridLM, prepared: Path, micro_batch_size: int) -> float:
    """Mean next-token loss over the response tokens of one pass over the validation split, batched as the
    trainer's evaluation batches it (the last batch wraps around to the split's start)."""
    loader = PackedLoader(prepared, "val", SEQ_LEN, micro_batch_size, shuffle=False)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for _ in range(-(-loader.num_rows // micro_batch_size)):
            batch = loader.next_batch()
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += model(batch["input_ids"], batch["doc_ids"], batch["labels"]).loss.item() * n
            count += n
    return total / count


def lora_model(model_dir: Path, weights: dict[str, torch.Tensor]) -> HybridLM:
    """The adapted model a LoRA checkpoint holds (adapter names), rebuilt from its base architecture."""
    model = HybridLM(ModelConfig.from_dict(json.loads((model_dir / "config.json").read_text())["model"]))
    apply_finetune(model, FinetuneConfig(lora=LoRAConfig(r=16, alpha=64, target_modules=TARGETS[1:-1].split(","))))
    model.load_state_dict({**weights, "lm_head.weight": weights["embed_tokens.weight"]})
    return model.eval()


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A random tiny hybrid saved with its tokenizer, fine-tuned with LoRA for 30 steps through run_train."""
    tmp = tmp_path_factory.mktemp("lora")
    base = save_base_model(tmp / "base", vocab_size=320)
    args = [
        *FINETUNE,
        *LORA,
        f"init_from={base}",
        f"data.prepared_dir={tmp / 'prepared'}",
        "train.max_steps=30",
        "train.lr=1e-2",
        "train.save_every=15",
        "train.keep_last=3",
        "train.sample_tokens=8",
    ]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = run_train(None, [*args, f"out_dir={tmp / 'run'}"])
    return {"tmp": tmp, "base": base, "args": args, "result": result, "out": tmp / "run", "printed": printed.getvalue()}


def test_lora_fine_tune_trains_only_the_adapters(lora_run):
    base = load_file(lora_run["base"] / "model.safetensors")
    final = load_file(lora_run["out"] / "checkpoints" / "step_00000030" / "model.safetensors")
    adapters = {k for k in final if ".lora_A." in k or ".lora_B." in k}
    assert len(adapters) == 2 * 9  # M*-: in/out_proj, q/k/v/o_proj, gate/up/down_proj
    for name, value in final.items():
        if name not in adapters:  # every base weight, adapted (base_layer) or not, exactly as loaded
            assert torch.equal(value, base[name.replace(".base_layer", "")]), name
    assert all(final[k].abs().sum() > 0 for k in adapters if ".lora_B." in k)  # peft starts B at zero
    moments = load_file(lora_run["out"] / "checkpoints" / "step_00000030" / "optimizer.safetensors")
    assert {k.split(".", 1)[1] for k in moments} == adapters  # only trainable parameters have AdamW state


def test_merged_export_loads_as_a_plain_model_with_the_adapted_logits(lora_run):
    out = lora_run["out"]
    exported = HybridLM.from_pretrained(out / "model").eval()
    adapted = lora_model(lora_run["base"], load_file(out / "checkpoints" / "step_00000030" / "model.safetensors"))
    base = HybridLM.from_pretrained(lora_run["base"]).eval()
    ids = torch.randint(0, 320, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, adapted(ids).logits, atol=1e-5, rtol=0)
        assert (exported(ids).logits - base(ids).logits).abs().max() > 1e-2  # the merge is not a no-op
    assert (out / "model" / "tokenizer.json").is_file()


def test_validation_loss_over_response_tokens_falls(lora_run):
    result, out = lora_run["result"], lora_run["out"]
    prepared = Path(json.loads((out / "config.json").read_text())["data"]["prepared_dir"])
    base_loss = response_loss(HybridLM.from_pretrained(lora_run["base"]), prepared, 4)
    tuned_loss = response_loss(HybridLM.from_pretrained(out / "model"), prepared, 4)
    # the trainer's evaluation is exactly this: the response tokens of the held-out examples
    assert result["val_loss"] == pytest.approx(tuned_loss, rel=1e-5)
    evals = [r["val_loss"] for r in read_metrics(out) if "val_loss" in r]
    assert len(evals) == 1 and evals[0] == result["val_loss"]
    assert tuned_loss < base_loss - 0.3  # seen: 5.75 -> 5.15 nats (a random base, adapters only)


def test_start_up_names_the_tokenizer_the_adapters_and_the_overlong_decisions(lora_run):
    printed, out = lora_run["printed"], lora_run["out"]
    manifest = read_manifest(json.loads((out / "config.json").read_text())["data"]["prepared_dir"])
    overlong = manifest["instruct"]["overlong"]
    assert f"data.tokenizer unset: using the checkpoint's tokenizer, {lora_run['base'] / 'tokenizer.json'}" in printed
    assert "finetune: LoRA r=16 alpha=64 dropout=0 on 9 modules" in printed
    assert f"{overlong['truncated']} truncated, {overlong['dropped']} dropped (data.overlong=truncate)" in printed
    assert f"{manifest['splits']['val']['documents']} val examples" in printed
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["data"]["tokenizer"] == str(lora_run["base"])
    assert resolved["model"]["d_model"] == 64  # the architecture came from the checkpoint


def test_sample_answers_the_first_validation_prompt(lora_run):
    prepared = read_manifest(json.loads((lora_run["out"] / "config.json").read_text())["data"]["prepared_dir"])
    assert prepared["kind"] == "instruct"
    prompt, answer = lora_run["result"]["sample"].split(" ⟶ ")
    assert "<|user|>\n" in prompt and prompt.endswith("<|assistant|>\n")  # the whole prompt, no response
    assert "Reverse" in prompt or "backwards" in prompt
    assert answer  # greedy tokens after the prompt (at most train.sample_tokens, up to EOS)


def test_resumed_lora_run_matches_the_uninterrupted_one(lora_run):
    middle = lora_run["out"] / "checkpoints" / "step_00000015"
    resumed = run_train(None, [*lora_run["args"], f"resume={middle}", f"out_dir={lora_run['tmp'] / 'resumed'}"])
    assert resumed["loss"] == lora_run["result"]["loss"]
    a, b = (
        load_file(d / "checkpoints" / "step_00000030" / "model.safetensors")
        for d in (lora_run["out"], lora_run["tmp"] / "resumed")
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lora_under_zero_3_gathers_frozen_weights_and_resumes(lora_run):
    tmp, base = lora_run["tmp"], lora_run["base"]
    args = [
        *lora_run["args"],
        "train.zero_stage=3",
        "train.max_steps=4",
        "train.save_every=2",
        "train.log_every=1",
        "train.sample_tokens=0",
    ]
    full = run_train(None, [*args, f"out_dir={tmp / 'zero3'}"])
    resumed = run_train(
        None, [*args, f"resume={tmp / 'zero3' / 'checkpoints' / 'step_00000002'}", f"out_dir={tmp / 'z3r'}"]
    )
    assert resumed["loss"] == pytest.approx(full["loss"], rel=1e-6)
    saved = load_file(tmp / "zero3" / "checkpoints" / "step_00000004" / "model.safetensors")
    initial = load_file(base / "model.safetensors")
    for name, value in saved.items():
        if ".lora_" not in name:
            assert torch.equal(value, initial[name.replace(".base_layer", "")]), name
    assert any(".lora_B." in name and value.abs().sum() > 0 for name, value in saved.items())
    HybridLM.from_pretrained(tmp / "zero3" / "model")  # merged from the gathered weights


# ----------------------------------------------------------------------------------------------
# From a Hugging Face checkpoint


def save_hf_bamba(out: Path) -> Path:
    """A random tiny transformers Bamba (Mamba-2 + attention) with a tokenizer beside it."""
    save_tokenizer(out)
    config = transformers.BambaConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        attn_layer_indices=[1],
        num_attention_heads=4,
        num_key_value_heads=2,
        mamba_n_heads=8,
        mamba_d_head=16,
        mamba_d_state=16,
        mamba_chunk_size=8,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(0)
    transformers.BambaForCausalLM(config).save_pretrained(out)
    return out


def hf_loss_per_document(hf_model, batch: dict[str, torch.Tensor]) -> float:
    """The batch's mean response-token loss with each packed example run through transformers on its own."""
    total, count = 0.0, 0
    for ids, labels, docs in zip(batch["input_ids"], batch["labels"], batch["doc_ids"], strict=True):
        for d in docs.unique():
            if d < 0:
                continue
            sel = docs == d
            logits = hf_model(ids[sel][None]).logits[0].float()
            target = labels[sel][1:]
            total += torch.nn.functional.cross_entropy(logits[:-1], target, ignore_index=-100, reduction="sum").item()
            count += int((target != -100).sum())
    return total / count


def test_fine_tune_from_a_hugging_face_checkpoint_and_export_back(tmp_path, monkeypatch):
    hf_dir = save_hf_bamba(tmp_path / "hf")
    first = {}
    original = HybridLM.forward

    def forward(self, input_ids, doc_ids=None, labels=None, cache=None):
        out = original(self, input_ids, doc_ids, labels, cache)
        if self.training and not first:
            first.update(input_ids=input_ids, doc_ids=doc_ids, labels=labels, loss=out.loss.item())
        return out

    monkeypatch.setattr(HybridLM, "forward", forward)
    args = [
        *FINETUNE,
        f"init_from={hf_dir}",
        f"data.prepared_dir={tmp_path / 'prepared'}",
        f"out_dir={tmp_path / 'run'}",
    ]
    run_train(None, [*args, "train.max_steps=3", "train.lr=1e-3", "train.sample_tokens=0"])
    monkeypatch.undo()

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        assert first["loss"] == pytest.approx(hf_loss_per_document(hf_model, first), abs=1e-4)

    assert hybridlm_cli(["convert", "to-hf", str(tmp_path / "run" / "model"), str(tmp_path / "hf-out")]) in (0, None)
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf-out").eval()
    tuned = HybridLM.from_pretrained(tmp_path / "run" / "model").eval()
    ids = first["input_ids"][:1, :40]
    with torch.no_grad():
        assert (exported(ids).logits[..., :320] - tuned(ids).logits).abs().max() < 1e-4
        assert (exported(ids).logits[..., :320] - hf_model(ids).logits[..., :320]).abs().max() > 1e-3  # it trained
    assert type(exported).__name__ == "BambaForCausalLM"


# ----------------------------------------------------------------------------------------------
# Refusals, before any training


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Checkpoints that cannot read the reverse-words tokenizer, and a prepared dir tokenized with it."""
    tmp = tmp_path_factory.mktemp("vocab")
    return {
        "tmp": tmp,
        "tokenizer": save_tokenizer(tmp / "tokenizer"),
        "small_vocab": save_base_model(tmp / "small", vocab_size=256, tokenizer=False),
        "other_tokenizer": save_tokenizer(save_base_model(tmp / "other", vocab_size=320, tokenizer=False), 300),
        "no_tokenizer": save_base_model(tmp / "bare", vocab_size=320, tokenizer=False),
    }


@pytest.mark.parametrize(
    ("checkpoint", "data_tokenizer", "error", "message"),
    [
        ("small_vocab", "tokenizer", DataError, r"init_from=.*: model.vocab_size=256 but the tokenizer has 320 tokens"),
        (
            "other_tokenizer",
            "tokenizer",
            DataError,
            r"init_from=.*other: the checkpoint was saved with another tokenizer",
        ),
        ("no_tokenizer", None, ConfigError, r"init_from=.*bare: no tokenizer.json beside the checkpoint"),
    ],
)
def test_a_checkpoint_that_cannot_read_the_tokenizer_is_refused_before_training(
    checkpoints, checkpoint, data_tokenizer, error, message
):
    tmp = checkpoints["tmp"]
    args = [*FINETUNE, f"init_from={checkpoints[checkpoint]}", f"data.prepared_dir={tmp / 'prepared'}"]
    if data_tokenizer:
        args.append(f"data.tokenizer={checkpoints[data_tokenizer]}")
    with pytest.raises(error, match=message):
        run_train(None, [*args, f"out_dir={tmp / checkpoint}"])
    assert not (tmp / checkpoint).exists()


def test_model_keys_that_contradict_the_checkpoint_are_named_and_runtime_keys_win():
    checkpoint = ModelConfig.from_dict({**TINY, "vocab_size": 320})
    with pytest.raises(
        ConfigError, match=r"init_from=ckpt: .*sets model.d_model=96 \(checkpoint: 64\), model.mamba.d_state"
    ):
        reconcile_model(ModelConfig.from_dict({"d_model": 96, "mamba": {"d_state": 8}}), checkpoint, "ckpt")
    same = ModelConfig.from_dict({**TINY, "pattern": "(M*-)x1", "vocab_size": 320, "attention": {"rope_theta": 5e5}})
    merged = reconcile_model(same, checkpoint, "ckpt")
    assert merged.attention.rope_theta == 5e5 and merged.pattern == "M*-"
    assert reconcile_model(ModelConfig(), checkpoint, "ckpt") is checkpoint  # no model: section


def test_init_from_finds_run_directories_and_refuses_unknown_ones(lora_run, tmp_path):
    run = lora_run["out"]
    assert resolve_init_from(str(run)).path == run / "model"
    assert resolve_init_from(str(run / "checkpoints" / "step_00000015")).tokenizer_dir is not None
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ConfigError, match=r"init_from=.*unsupported model_type 'gpt2'"):
        resolve_init_from(str(tmp_path))
    with pytest.raises(ConfigError, match=r"init_from=/nonexistent: not a hybridlm model directory"):
        resolve_init_from("/nonexistent")


def test_importing_the_training_package_does_not_load_the_trainer():
    code = (
        "import sys, hybridlm.train; print(sorted({'hybridlm.train.trainer', 'datasets', 'peft'} & set(sys.modules)))"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
