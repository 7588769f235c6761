"""HF interop: for every target, hybridlm and transformers' own classes give the same logits and
greedy tokens in both directions; hybridlm -> HF -> hybridlm is bit-identical (fp32 and bf16);
models a target cannot express are refused with what does not fit and which targets would work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file

from hybridlm.convert import ConvertError, export_to_hf, import_from_hf, load_hf_as_hybridlm, select_target
from hybridlm.model import HybridLM

PARITY = 1e-4  # max abs logit difference, fp32
NEW_TOKENS = 32

# One hybridlm model per target, each exercising what that target maps (biases, GQA, partial RoPE,
# groups, routers, shared experts, tied and untied heads); merged into tests/conftest.py's tiny model.
OURS = {
    "bamba": dict(
        pattern="M-*-M-",
        tie_embeddings=False,
        attention={"rope_fraction": 0.5, "rope_theta": 500.0, "bias": True},
        mlp={"bias": True},
        mamba={"proj_bias": True},
    ),
    "granitemoehybrid": dict(pattern="ME*EME", moe={"router": "softmax_norm", "shared_d_ff": 16}),
    "nemotron_h": dict(
        pattern="M-*EME",
        attention={"rope": False},
        mlp={"activation": "relu2"},
        mamba={"conv_bias": False},
        moe={"router": "sigmoid", "n_groups": 2, "topk_groups": 1, "scale": 2.5, "shared_d_ff": 16},
    ),
    "jamba": dict(
        pattern="M-*EM-*E",
        mamba={"version": 1, "inner_norms": True},
        attention={"rope": False},
        moe={"router": "softmax", "d_ff": 48},
    ),
    "mamba2": dict(pattern="MMM", mamba={"dt_limit": [0.001, 2.0]}),
    "mamba": dict(pattern="MMM", mamba={"version": 1}),
    "llama": dict(pattern="*-*-", tie_embeddings=False, attention={"n_kv_heads": 4}),
}


def hf_configs() -> dict[str, transformers.PretrainedConfig]:
    """One tiny model per target, described with transformers' own config classes."""
    tokens = dict(vocab_size=96, bos_token_id=None, eos_token_id=None, pad_token_id=None, initializer_range=0.2)
    attn = dict(num_attention_heads=4, num_key_value_heads=2)
    mamba2 = dict(mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=16, mamba_chunk_size=8)
    return {
        "bamba": transformers.BambaConfig(
            **tokens,
            **attn,
            **mamba2,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=3,
            attn_layer_indices=[1],
            attention_bias=True,
            rms_norm_eps=1e-6,
        ),
        "granitemoehybrid": transformers.GraniteMoeHybridConfig(
            **tokens,
            **attn,
            **mamba2,
            hidden_size=64,
            intermediate_size=48,
            num_hidden_layers=3,
            layer_types=["linear_attention", "full_attention", "linear_attention"],
            position_embedding_type="rope",
            num_local_experts=4,
            num_experts_per_tok=2,
            shared_intermediate_size=32,
            attention_multiplier=16**-0.5,
            tie_word_embeddings=True,
        ),
        "nemotron_h": transformers.NemotronHConfig(
            **tokens,
            **attn,
            head_dim=16,
            hidden_size=64,
            intermediate_size=96,
            mlp_hidden_act="relu2",
            layers_block_type=["linear_attention", "moe", "full_attention", "mlp", "linear_attention"],
            mamba_num_heads=8,
            mamba_head_dim=16,
            ssm_state_size=16,
            n_groups=2,
            chunk_size=8,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=48,
            moe_shared_expert_intermediate_size=32,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=2.5,
        ),
        "jamba": transformers.JambaConfig(
            **tokens,
            **attn,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=4,
            attn_layer_period=2,
            attn_layer_offset=1,
            expert_layer_period=2,
            expert_layer_offset=0,
            num_experts=4,
            num_experts_per_tok=2,
            mamba_d_state=16,
            mamba_dt_rank=8,
        ),
        "mamba2": transformers.Mamba2Config(
            **tokens,
            num_heads=8,
            head_dim=16,
            hidden_size=64,
            state_size=16,
            num_hidden_layers=2,
            n_groups=2,
            chunk_size=8,
        ),
        "mamba": transformers.MambaConfig(
            **tokens, hidden_size=64, state_size=16, num_hidden_layers=2, time_step_rank=8
        ),
        "llama": transformers.LlamaConfig(
            **tokens,
            **attn,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            attention_bias=True,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        ),
    }


def our_model(tiny_config, perturb, arch: str, dtype: torch.dtype = torch.float32) -> HybridLM:
    model = HybridLM(tiny_config(init_std=0.1, **OURS[arch])).eval()
    perturb(model)
    return model.cast(dtype) if dtype != torch.float32 else model


def assert_same_function(ours: HybridLM, theirs: torch.nn.Module, vocab_size: int) -> float:
    """Logits within PARITY on random tokens and identical greedy continuations; returns the max diff."""
    ids = torch.randint(0, vocab_size, (2, 19))  # not a multiple of the SSD chunk
    with torch.no_grad():
        ours_logits = ours(ids).logits
        their_logits = theirs(ids).logits[..., :vocab_size]
    diff = (ours_logits - their_logits).abs().max().item()
    assert diff < PARITY, f"max abs logit difference {diff:.2e}"
    prompt = ids[:1, :5]
    ours_tokens = ours.generate(prompt, NEW_TOKENS, temperature=0)
    their_tokens = theirs.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(ours_tokens, their_tokens)
    return diff


@pytest.mark.parametrize("arch", OURS)
def test_export_matches_transformers_and_round_trips_bit_identical(tmp_path, tiny_config, perturb, arch):
    model = our_model(tiny_config, perturb, arch)
    model.save_pretrained(tmp_path / "ours")
    assert select_target(model.cfg).MODEL_TYPE == arch  # the most specific target is chosen by default
    out = export_to_hf(tmp_path / "ours", tmp_path / "hf")

    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.config.model_type == arch
    assert_same_function(model, hf, model.cfg.vocab_size)

    import_from_hf(out, tmp_path / "back")
    assert_bit_identical(tmp_path / "ours", tmp_path / "back")


@pytest.mark.parametrize("arch", OURS)
def test_import_of_a_transformers_model_matches_it(tmp_path, perturb, arch):
    hf = transformers.AutoModelForCausalLM.from_config(hf_configs()[arch]).eval()
    perturb(hf)
    hf.save_pretrained(tmp_path / "hf")  # transformers' own on-disk layout (per-expert modules, backbone., ...)

    ours = load_hf_as_hybridlm(tmp_path / "hf").eval()
    assert_same_function(ours, hf, hf.config.vocab_size)


@pytest.mark.parametrize("arch", OURS)
def test_bf16_stays_bf16_and_ssm_parameters_stay_fp32(tmp_path, tiny_config, perturb, arch):
    model = our_model(tiny_config, perturb, arch, torch.bfloat16)
    model.save_pretrained(tmp_path / "ours")
    out = export_to_hf(tmp_path / "ours", tmp_path / "hf", arch=arch)

    with safe_open(out / "model.safetensors", "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    ssm = ("A_log", "D", "dt_bias", "dt_proj.bias", "e_score_correction_bias")  # the router bias: fp32 as in HF
    assert {d for k, d in dtypes.items() if k.endswith(ssm)} <= {"F32"}
    assert {d for k, d in dtypes.items() if not k.endswith(ssm)} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"

    import_from_hf(out, tmp_path / "back")
    assert_bit_identical(tmp_path / "ours", tmp_path / "back")


def test_a_sharded_export_loads_in_transformers_and_imports_back(tmp_path, tiny_config, perturb):
    model = our_model(tiny_config, perturb, "nemotron_h")
    model.save_pretrained(tmp_path / "ours")
    out = export_to_hf(tmp_path / "ours", tmp_path / "hf", max_shard_size="40KB")

    shards = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert len(shards) > 1
    assert_same_function(model, transformers.AutoModelForCausalLM.from_pretrained(out).eval(), model.cfg.vocab_size)
    import_from_hf(out, tmp_path / "back")
    assert_bit_identical(tmp_path / "ours", tmp_path / "back")


def test_an_edited_hf_config_wins_over_the_hybridlm_config_stored_in_it(tmp_path, tiny_config, perturb):
    model = our_model(tiny_config, perturb, "bamba")
    model.save_pretrained(tmp_path / "ours")
    out = export_to_hf(tmp_path / "ours", tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-3}))

    ours = load_hf_as_hybridlm(out).eval()

    assert ours.cfg.norm_eps == 1e-3
    assert ours.cfg.vocab_size == model.cfg.padded_vocab_size  # the true size was only in the stored config
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 19))
    with torch.no_grad():
        assert (ours(ids).logits - hf(ids).logits).abs().max() < PARITY


def assert_bit_identical(a: Path, b: Path) -> None:
    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert first.keys() == second.keys()
    for key, tensor in first.items():
        assert tensor.dtype == second[key].dtype, key
        assert torch.equal(tensor, second[key]), key
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())


# ----------------------------------------------------------------------------------------------
# Refusals and bad input


@pytest.mark.parametrize(
    "overrides, arch, expected",
    [
        (
            dict(pattern="M-*-*-M-", mamba={"version": 1, "inner_norms": True}, attention={"rope": False}),
            "jamba",
            r"attention at decoder layers \[1, 2\] is not periodic.*no supported target",
        ),
        (
            dict(pattern="M-*-", attention={"rope": True}),
            "nemotron_h",
            r"no positional encoding.*targets that can: bamba",
        ),
        (
            dict(pattern="M-*-", attention={"rope": False}),
            "bamba",
            r"always applies RoPE.*targets that can: granitemoehybrid",
        ),
        (
            dict(pattern="M-*-", mlp={"activation": "relu2"}, attention={"rope": False}),
            "granitemoehybrid",
            r"SwiGLU, not relu2.*targets that can: nemotron_h",
        ),
        (dict(pattern="*-*-", attention={"window": 4}), "llama", r"sliding window.*no supported target"),
        (dict(pattern="M-M-"), "bamba", r"cannot generate without an attention layer.*no supported target"),
    ],
)
def test_a_target_that_cannot_express_the_model_says_what_and_who_can(tiny_config, overrides, arch, expected):
    with pytest.raises(ConvertError, match=expected):
        select_target(tiny_config(**overrides), arch)


def test_auto_selection_refuses_a_model_no_target_expresses_with_every_reason(tiny_config):
    cfg = tiny_config(pattern="M*-", mamba={"version": 1}, attention={"rope": True})
    with pytest.raises(ConvertError, match=r"no Hugging Face architecture.*nemotron_h: .*Mamba-2.*jamba: ") as e:
        select_target(cfg)
    assert all(name in str(e.value) for name in OURS)


def test_unknown_target_and_unknown_architecture_list_the_supported_ones(tmp_path, tiny_config):
    with pytest.raises(ConvertError, match=r"unknown target architecture 'gpt2'; supported: bamba, "):
        select_target(tiny_config(), "gpt2")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(ConvertError, match=r"unsupported model_type 'gpt2'; supported: bamba, .*mamba_ssm"):
        import_from_hf(tmp_path, tmp_path / "out")


def test_a_checkpoint_whose_weights_do_not_fit_its_config_is_refused(tmp_path):
    hf = transformers.AutoModelForCausalLM.from_config(hf_configs()["llama"])
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 64}))
    with pytest.raises(ConvertError, match=r"model.layers.0.mlp.gate_proj.weight: shape \(96, 64\) does not match"):
        load_hf_as_hybridlm(tmp_path)


def test_a_run_checkpoint_exports_with_its_tokenizer_token_ids_and_model_card(tmp_path, tiny_config, perturb):
    from tokenizers import Tokenizer, models

    run = tmp_path / "run" / "step_100"
    model = our_model(tiny_config, perturb, "bamba")
    model.save_pretrained(run / "model")  # a training checkpoint keeps the model in model/
    vocab = {f"t{i}": i for i in range(model.cfg.vocab_size - 2)} | {"<eos>": 59, "<bos>": 60}
    Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(run / "tokenizer.json"))
    (run / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>", "bos_token": {"content": "<bos>"}}))

    out = export_to_hf(run, tmp_path / "hf")

    assert (out / "tokenizer.json").read_bytes() == (run / "tokenizer.json").read_bytes()
    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    assert (config["eos_token_id"], config["bos_token_id"], generation["eos_token_id"]) == (59, 60, 59)
    assert generation["suppress_tokens"] == list(range(model.cfg.vocab_size, model.cfg.padded_vocab_size))
    card = (out / "README.md").read_text()
    assert "| 2 | attention | `model.layers.1.self_attn` |" in card
    assert "| 3 | MLP | `model.layers.1.feed_forward` |" in card
    import_from_hf(out, tmp_path / "back")
    assert (tmp_path / "back" / "tokenizer_config.json").is_file()
