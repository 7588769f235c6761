"""Hugging Face interop: export hybridlm models to native transformers architectures and import
HF (and mamba_ssm) checkpoints, with logit parity.

One module per architecture family, each a weight table used in both directions
(``bamba``, ``granitemoehybrid``, ``nemotron_h``, ``jamba``, ``mamba2``, ``mamba``, ``llama``;
``mamba_ssm`` imports only). ``targets`` chooses the export architecture; ``checkpoint`` reads and
writes the directories.
"""

from hybridlm.convert.checkpoint import export_to_hf, import_from_hf, load_hf_as_hybridlm
from hybridlm.convert.common import ConvertError
from hybridlm.convert.targets import TARGETS, expressible_by, select_target

__all__ = [
    "TARGETS",
    "ConvertError",
    "export_to_hf",
    "expressible_by",
    "import_from_hf",
    "load_hf_as_hybridlm",
    "select_target",
]
