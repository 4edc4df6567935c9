"""ablate: layer-count ablations of Depth Up-Scaling (SOLAR's DUS) against MoE upcycling.

Modules, each with one job (dependencies point down this list's reverse order):

- ``plan``      the DUS layer plan, pure Python
- ``upscale``   depth up-scaling of a Hugging Face causal LM, and its export CLI
- ``moe``       Mixtral-style sparse upcycling of a dense model, and its export CLI
- ``params``    total and active parameter counts
- ``checkpoint`` resolving a base-model spec and streaming safetensors checkpoints
- ``synthetic`` the deterministic synthetic corpus and its evaluation tasks
- ``data``      packed, cached token batches from the corpus, local files or the hub
- ``zoo``       the small built-in base models, trained on first use
- ``train``     continued pretraining
- ``evaluate``  the fast evaluation (lm-eval and held-out perplexity)

Importing ``ablate`` imports nothing heavy; import the submodule you need.
"""

__version__ = "0.1.0"
