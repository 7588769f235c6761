"""The layer pattern: one character per residual sub-layer ``h = h + f(norm(h))``.

``M`` Mamba mixer, ``*`` attention, ``-`` dense MLP, ``E`` mixture-of-experts FFN (the
convention of Megatron-LM's hybrid models and Nemotron-H). Whitespace and ``|`` separate
groups for readability; ``(...)xN`` repeats a group and may nest. The Jamba form (decoder
layers of mixer + FFN at periodic offsets) compiles to the same canonical string.

New sub-layer kinds are additions to ``SUBLAYER_KINDS``; new grammar forms are additions to
``_parse_group``.
"""

from __future__ import annotations

import re

SUBLAYER_KINDS = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}
MIXER_CHARS = "M*"
FFN_CHARS = "-E"


class PatternError(ValueError):
    """A layer pattern that cannot be parsed; the message names the offending text."""


def expand_pattern(pattern: str) -> str:
    """Expand a pattern with separators and ``(...)xN`` repeats into one character per sub-layer."""
    text = re.sub(r"[\s|]", "", pattern)
    expanded, end = _parse_group(text, 0, pattern)
    if end != len(text):
        raise PatternError(f"unbalanced ')' at position {end} in pattern {pattern!r}")
    if not expanded:
        raise PatternError(f"pattern {pattern!r} has no layers")
    return expanded


def _parse_group(text: str, pos: int, original: str) -> tuple[str, int]:
    out: list[str] = []
    while pos < len(text):
        ch = text[pos]
        if ch in SUBLAYER_KINDS:
            out.append(ch)
            pos += 1
        elif ch == "(":
            inner, pos = _parse_group(text, pos + 1, original)
            if pos >= len(text) or text[pos] != ")":
                raise PatternError(f"unclosed '(' in pattern {original!r}")
            repeat = re.match(r"x(\d+)", text[pos + 1 :])
            if repeat is None:
                raise PatternError(f"'(...)' must be followed by xN (a repeat count) in pattern {original!r}")
            out.append(inner * int(repeat.group(1)))
            pos += 1 + repeat.end()
        elif ch == ")":
            return "".join(out), pos
        else:
            known = ", ".join(f"{c!r} ({k})" for c, k in SUBLAYER_KINDS.items())
            raise PatternError(f"unknown layer character {ch!r} in pattern {original!r}; known: {known}")
    return "".join(out), pos


def jamba_pattern(n_layers: int, attn_period: int, attn_offset: int, moe_period: int = 0, moe_offset: int = 0) -> str:
    """Compile Jamba's layout (decoder layer i = mixer + FFN) to the canonical sub-layer string.

    Layer i uses attention when ``i % attn_period == attn_offset`` (else Mamba) and an MoE FFN
    when ``moe_period > 0 and i % moe_period == moe_offset`` (else a dense MLP).
    """
    if n_layers <= 0:
        raise PatternError(f"n_layers={n_layers} must be positive")
    for name, period, offset in (("attn", attn_period, attn_offset), ("moe", moe_period, moe_offset)):
        # an offset outside [0, period) would silently give a model without that layer kind
        if period < 0 or (period > 0 and not 0 <= offset < period):
            raise PatternError(f"{name}_offset={offset} must be in [0, {name}_period={period}) (period >= 0)")
    chars = []
    for i in range(n_layers):
        chars.append("*" if attn_period > 0 and i % attn_period == attn_offset else "M")
        chars.append("E" if moe_period > 0 and i % moe_period == moe_offset else "-")
    return "".join(chars)


def pattern_counts(pattern: str) -> dict[str, int]:
    """Number of sub-layers of each kind, keyed by kind name."""
    return {kind: pattern.count(ch) for ch, kind in SUBLAYER_KINDS.items()}
