"""Runnable examples of the diffusers integration: ``python -m cg_fast.integrations.examples.<name>`` (offline on tiny
random models by default; ``--model`` for a local checkpoint folder). Needs ``cg_fast[diffusers]``."""
