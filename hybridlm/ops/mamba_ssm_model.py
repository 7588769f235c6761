"""mamba_ssm's own language model, ``MambaLMHeadModel``: the model the kernels' authors train with them,
built as ``hybridlm bench``'s anchor. It lives here because this package is the one place that imports kernel
packages; its config comes from ``hybridlm.convert.mamba_ssm.raw_config``."""

from __future__ import annotations

from typing import Any

from torch import nn


def mamba_lm_head_model(raw_config: dict[str, Any]) -> nn.Module:
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    return MambaLMHeadModel(MambaConfig(**raw_config))
