"""Config loading: every bad value is a one-line ConfigError naming the dotted key and the value;
overrides are typed as YAML; a config survives a YAML round trip."""

import math
import re

import pytest
import yaml

from hybridlm.config import ConfigError, JambaLayout, ModelConfig, RunConfig, load_run_config


def model_error(d: dict) -> str:
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict(d)
    message = str(err.value)
    assert "\n" not in message
    return message


def run_error(overrides: list[str], path=None) -> str:
    with pytest.raises(ConfigError) as err:
        load_run_config(path, overrides)
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    "d, expected",
    [
        ({"d_modle": 64}, "unknown key model.d_modle; did you mean model.d_model?"),
        ({"mamba": {"d_stat": 16}}, "unknown key model.mamba.d_stat; did you mean model.mamba.d_state?"),
        ({"attention": {"n_head": 4}}, "did you mean model.attention.n_heads?"),
        ({"zzz": 1}, "unknown key model.zzz"),
    ],
)
def test_unknown_keys_suggest_the_closest(d, expected):
    assert expected in model_error(d)


def test_unknown_key_in_jamba_layout_suggests_the_closest():
    assert "did you mean model.pattern.n_layers?" in model_error({"pattern": {"n_layer": 4, "attn_period": 2}})


@pytest.mark.parametrize(
    "d, key_and_value",
    [
        ({"d_model": "abc"}, "model.d_model='abc'"),
        ({"d_model": True}, "model.d_model=True"),  # YAML booleans are not integers
        ({"d_model": 64.0}, "model.d_model=64.0"),
        ({"norm_eps": "small"}, "model.norm_eps='small'"),
        ({"tie_embeddings": "yes"}, "model.tie_embeddings='yes'"),
        ({"mamba": {"version": 3}}, "model.mamba.version=3"),
        ({"mamba": {"version": True}}, "model.mamba.version=True"),
        ({"mlp": {"activation": "relu"}}, "model.mlp.activation='relu'"),
        ({"attention": {"n_kv_heads": "two"}}, "model.attention.n_kv_heads='two'"),
        ({"mamba": {"dt_limit": [0.0]}}, "model.mamba.dt_limit=[0.0]"),
        ({"mamba": 5}, "model.mamba must be a mapping"),
    ],
)
def test_wrong_types_name_key_and_value(d, key_and_value):
    assert key_and_value in model_error(d)


@pytest.mark.parametrize(
    "d, needles",
    [
        ({"pattern": "*-", "d_model": 30, "attention": {"n_heads": 4}}, ["model.d_model=30", "n_heads=4"]),
        ({"pattern": "*-", "attention": {"n_heads": 8, "n_kv_heads": 3}}, ["model.attention.n_kv_heads=3"]),
        ({"d_model": 64, "mamba": {"head_dim": 48}}, ["model.mamba.head_dim=48", "128"]),  # 48 does not divide 128
        ({"d_model": 24, "mamba": {"head_dim": 12}}, ["model.mamba.head_dim=12", "multiple of 8"]),
        ({"d_model": 64, "mamba": {"head_dim": 32, "ngroups": 3}}, ["model.mamba.ngroups=3", "4"]),
        ({"d_model": 64, "mamba": {"head_dim": 16, "d_state": 6}}, ["model.mamba", "= 140", "multiple of 8"]),
        ({"mamba": {"chunk_size": 100}}, ["model.mamba.chunk_size=100"]),
        ({"mamba": {"inner_norms": True}}, ["model.mamba.inner_norms=true"]),
        ({"pattern": "*", "attention": {"rope_fraction": 1.5}}, ["model.attention.rope_fraction=1.5"]),
        ({"pattern": "*", "attention": {"window": 0}}, ["model.attention.window=0"]),
        ({"pattern": "E", "moe": {"n_experts": 4, "top_k": 5}}, ["model.moe.top_k=5", "n_experts=4"]),
        ({"vocab_size": 0}, ["model.vocab_size=0"]),
    ],
)
def test_shape_constraints_name_key_and_value(d, needles):
    message = model_error(d)
    for needle in needles:
        assert needle in message


def test_constraints_of_absent_layer_kinds_are_not_checked():
    # no attention in the pattern: n_heads need not divide d_model
    cfg = ModelConfig.from_dict({"pattern": "M-", "d_model": 32, "attention": {"n_heads": 3}})
    assert cfg.layers == "M-"


def test_seq_len_must_be_a_multiple_of_the_ssd_chunk():
    message = run_error(["train.seq_len=100", "model.mamba.chunk_size=64"])
    assert "train.seq_len=100" in message and "chunk_size=64" in message
    # Mamba-1 has no chunk constraint
    assert load_run_config(None, ["train.seq_len=100", "model.mamba.version=1"]).train.seq_len == 100


def test_overrides_are_typed_as_yaml():
    cfg = load_run_config(
        None,
        [
            "model.d_model=512",
            "model.tie_embeddings=false",
            "model.attention.window=null",
            "model.attention.rope_theta=500000.0",
            "model.mamba.dt_limit=[0.001, .inf]",
            "model.pattern=(M-*-)x2",
            "train.lr=0.001",
            "out_dir=runs/x",
        ],
    )
    assert cfg.model.d_model == 512 and isinstance(cfg.model.d_model, int)
    assert cfg.model.tie_embeddings is False
    assert cfg.model.attention.window is None
    assert cfg.model.attention.rope_theta == 5e5
    assert load_run_config(None, ["model.attention.rope_theta=10000"]).model.attention.rope_theta == 1e4  # int -> float
    assert cfg.model.mamba.dt_limit == (0.001, math.inf)
    assert cfg.model.layers == "M-*-M-*-"
    assert cfg.train.lr == 1e-3
    assert cfg.out_dir == "runs/x"


def test_overrides_replace_values_from_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  d_model: 128\n  pattern: M-*-\ntrain:\n  seq_len: 512\n")
    cfg = load_run_config(path, ["model.d_model=256"])
    assert cfg.model.d_model == 256 and cfg.model.layers == "M-*-" and cfg.train.seq_len == 512


@pytest.mark.parametrize(
    "override, needle",
    [
        ("model.d_model", "'model.d_model' must look like key=value"),
        ("=512", "'=512' must look like key=value"),
        ("model.d_model.x=1", "model.d_model={'x': 1}"),
        ("model.d_modl=512", "unknown key model.d_modl; did you mean model.d_model?"),
        ("model.d_model=abc", "model.d_model='abc'"),
        ("train.schedule=exp", "train.schedule='exp'"),
    ],
)
def test_bad_overrides_are_rejected(override, needle):
    assert needle in run_error([override])


def test_scientific_notation_without_a_dot_is_a_float():
    cfg = load_run_config(None, ["train.lr=3e-4", "model.attention.rope_theta=1e6"])
    assert cfg.train.lr == 3e-4 and cfg.model.attention.rope_theta == 1e6


def test_override_below_a_value_is_rejected(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  d_model: 64\n")
    assert "'d_model' is not a section" in run_error(["model.d_model.x=1"], path)


def test_config_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert str(missing) in run_error([], missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    assert str(bad) in run_error([], bad)
    wrong_key = tmp_path / "typo.yaml"
    wrong_key.write_text("model:\n  d_model: 64\ntrian:\n  lr: 0.1\n")
    assert re.search(r"unknown key trian; did you mean train\?", run_error([], wrong_key))


def test_run_config_yaml_round_trip(tmp_path):
    cfg = load_run_config(
        None,
        [
            "model.pattern={n_layers: 4, attn_period: 2, attn_offset: 1, moe_period: 2, moe_offset: 0}",
            "model.mamba.version=1",
            "model.mamba.inner_norms=true",
            "model.moe.router=sigmoid",
            "model.attention.window=128",
            "train.schedule=wsd",
            "data.sources=[{path: data/x.txt, weight: 2.0}]",
        ],
    )
    assert isinstance(cfg.model.pattern, JambaLayout)
    path = tmp_path / "round.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    again = load_run_config(path)
    assert again == cfg
    assert again.model.mamba.dt_limit == (0.0, math.inf)  # inf survives as a YAML string
    assert isinstance(again, RunConfig)


def test_model_config_from_yaml_reads_the_model_section(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"d_model": 64, "pattern": "M*"}, "train": {"lr": 0.1}}))
    cfg = ModelConfig.from_yaml(path)
    assert cfg.d_model == 64 and cfg.layers == "M*"
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_derived_sizes():
    cfg = ModelConfig.from_dict(
        {"vocab_size": 1000, "d_model": 64, "vocab_pad_multiple": 128, "mamba": {"head_dim": 16, "ngroups": 2}}
    )
    assert cfg.padded_vocab_size == 1024
    assert cfg.d_inner == 128 and cfg.mamba_n_heads == 8
    assert cfg.conv_channels == 128 + 2 * 2 * 128
    assert cfg.d_ff == 192  # SwiGLU: 8/3 * 64 rounded up to 64
