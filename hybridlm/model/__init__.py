"""The hybrid model: one module per sub-layer kind, assembled by the layer pattern."""

from hybridlm.model.cache import InferenceCache
from hybridlm.model.model import HybridLM, LMOutput

__all__ = ["HybridLM", "InferenceCache", "LMOutput"]
