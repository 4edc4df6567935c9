"""ablate: layer-count ablations of Depth Up-Scaling (SOLAR's DUS) against MoE upcycling.

Modules, each with one job (``tests/test_architecture.py`` keeps their imports free of cycles):

- ``errors``, ``fsutil``, ``torchutil``  one-line user errors; atomic writes and the cache home; eval mode
- ``plan``       layer plans (solar, stack, llama_pro, mid, similar, prune), pure Python
- ``params``     total and active parameter counts
- ``synthetic``  the deterministic synthetic corpus and its evaluation tasks
- ``data``       packed, cached token batches from the corpus, local files or the hub
- ``train``      continued pretraining
- ``evaluate``   the fast evaluation (lm-eval and held-out perplexity)
- ``objective``  the study's single number and its direction
- ``config``     the study schema
- ``zoo``, ``zoobuild``  the small built-in base models, trained on first use; building several at once
- ``base``       the one place a base spec (zoo name, folder, hub id) is resolved, validated and loaded
- ``upscale``, ``moe``, ``export``, ``exportcli``  the growth operators, their streaming exports and CLI
- ``storage``, ``search``  Optuna storages and workers; the search space and samplers
- ``trial``      one trial: build, train, evaluate, and write its record ``trials/N/result.json``
- ``preflight``  everything that can reject a study, before anything is written
- ``study``      the study loop; ``summary`` its end-of-run table
- ``results``, ``check``  the study table read from the trial records; the audit of the records
- ``stats``      paired statistics over repeats and budget points: lr choice, gaps to the control, best m
- ``redundancy``, ``plots``, ``studyplots``, ``figures``  analysis and the figures command
- ``cli``        the ``ablate`` command: one dispatch table of the subcommands

Importing ``ablate`` imports nothing heavy; import the submodule you need.
"""

__version__ = "0.1.0"
