"""Insight tools: synthetic recall tasks (``tasks``: MQAR, needle in a haystack), their evaluation
(``recall``: ``hybridlm eval recall``), per-token SSM state and attention inspection (``inspect``:
``hybridlm inspect``) and their figures (``plots``)."""
