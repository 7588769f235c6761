"""hybridlm: a training stack for hybrid Mamba-Transformer language models."""

from hybridlm.config import ConfigError, ModelConfig, RunConfig, load_run_config
from hybridlm.model import HybridLM, InferenceCache

__all__ = ["ConfigError", "HybridLM", "InferenceCache", "ModelConfig", "RunConfig", "load_run_config"]
__version__ = "0.1.0"
