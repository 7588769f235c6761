"""Stub "models" for scoring tests: they return ``LMOutput`` logits like ``HybridLM`` does."""

from __future__ import annotations

import torch
from torch import nn

from hybridlm.model.model import LMOutput


class NextTokenPeeker(nn.Module):
    """Cheats by reading the next input token: right on every teacher-forced answer."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, input_ids: torch.Tensor) -> LMOutput:
        nxt = torch.roll(input_ids, -1, dims=1)
        return LMOutput(nn.functional.one_hot(nxt, self.vocab_size).float())


class MQAROracle(nn.Module):
    """Answers an MQAR query from the prompt alone: the token after the first occurrence of the
    current token (keys first occur in the key-value section, at even positions)."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, input_ids: torch.Tensor) -> LMOutput:
        batch, seqlen = input_ids.shape
        same = input_ids[:, :, None] == input_ids[:, None, :]  # (batch, t, s): token t seen at s
        causal = torch.ones(seqlen, seqlen, dtype=torch.bool).tril()
        first = (same & causal).float().argmax(dim=-1)  # first position holding token t, <= t
        answer = input_ids.gather(1, (first + 1).clamp(max=seqlen - 1))
        return LMOutput(nn.functional.one_hot(answer, self.vocab_size).float())


class RandomGuesser(nn.Module):
    def __init__(self, vocab_size: int, seed: int = 0):
        super().__init__()
        self.vocab_size, self.generator = vocab_size, torch.Generator().manual_seed(seed)

    def forward(self, input_ids: torch.Tensor) -> LMOutput:
        return LMOutput(torch.rand(*input_ids.shape, self.vocab_size, generator=self.generator))
