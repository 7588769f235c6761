"""The layer pattern: the string form with separators and repeats, the Jamba form, and bad input."""

import re

import pytest

from hybridlm.config import ConfigError, JambaLayout, ModelConfig
from hybridlm.pattern import PatternError, expand_pattern, jamba_pattern, pattern_counts


@pytest.mark.parametrize(
    "pattern, expected",
    [
        ("M-M-*-", "M-M-*-"),
        ("M- M-\t*-\n", "M-M-*-"),
        ("M-|M-|*E", "M-M-*E"),
        ("(M-M-*-)x4", "M-M-*-" * 4),
        ("(M-)x2 | *-", "M-M-*-"),
        ("((M-)x2*-)x2", "M-M-*-M-M-*-"),
        ("(M)x12", "M" * 12),
        ("(M-)x0 *-", "*-"),
    ],
)
def test_expand_pattern(pattern, expected):
    assert expand_pattern(pattern) == expected


@pytest.mark.parametrize(
    "pattern, message",
    [
        ("", "has no layers"),
        ("  | ", "has no layers"),
        ("M-X-", "unknown layer character 'X'"),
        ("M-m", "unknown layer character 'm'"),
        ("(M-M-", "unclosed '('"),
        ("((M-)x2", "unclosed '('"),
        ("M-)x2", "unbalanced ')'"),
        ("(M-)", "must be followed by xN"),
        ("(M-)x", "must be followed by xN"),
        ("(M-)*2", "must be followed by xN"),
    ],
)
def test_bad_patterns_are_rejected(pattern, message):
    with pytest.raises(PatternError, match=re.escape(message)) as err:
        expand_pattern(pattern)
    assert repr(pattern) in str(err.value)  # the message quotes the whole pattern
    assert "\n" not in str(err.value)


def test_jamba_layout_compiles_to_the_canonical_string():
    # Jamba v0.1: 8-layer blocks, attention at offset 4, MoE every other layer from offset 1
    assert jamba_pattern(8, attn_period=8, attn_offset=4, moe_period=2, moe_offset=1) == "M-MEM-ME*-MEM-ME"
    assert jamba_pattern(4, attn_period=2, attn_offset=1) == "M-*-M-*-"
    assert jamba_pattern(3, attn_period=0, attn_offset=0) == "M-M-M-"  # period 0: no attention


def test_jamba_layout_from_config_equals_the_string_form():
    jamba = ModelConfig.from_dict(
        {"d_model": 64, "pattern": {"n_layers": 4, "attn_period": 4, "attn_offset": 2, "moe_period": 2}}
    )
    assert isinstance(jamba.pattern, JambaLayout)
    assert jamba.layers == "MEM-*EM-"
    assert jamba.layers == ModelConfig.from_dict({"d_model": 64, "pattern": "(ME M-)x1 *E M-"}).layers


@pytest.mark.parametrize(
    "layout, message",
    [
        ({"n_layers": 0, "attn_period": 2}, "n_layers=0"),
        ({"n_layers": 4, "attn_period": 2, "attn_offset": 2}, "attn_offset=2"),
        ({"n_layers": 4, "attn_period": 2, "moe_period": 2, "moe_offset": 3}, "moe_offset=3"),
    ],
)
def test_bad_jamba_layouts_are_rejected(layout, message):
    with pytest.raises(ConfigError, match=message) as err:
        ModelConfig.from_dict({"pattern": layout})
    assert str(err.value).startswith("model.pattern")


def test_pattern_counts():
    assert pattern_counts("M-M-*EM-") == {"mamba": 3, "attention": 1, "mlp": 3, "moe": 1}


def test_config_pattern_errors_name_the_key_and_value():
    with pytest.raises(ConfigError, match=r"model\.pattern: .*'M-Q'"):
        ModelConfig.from_dict({"pattern": "M-Q"})
    with pytest.raises(ConfigError, match=r"model\.pattern: pattern '' has no layers"):
        ModelConfig.from_dict({"pattern": ""})
