"""``python -m hybridlm ...`` is the ``hybridlm`` command."""

from hybridlm.cli import main

main()
