"""The pipeline's stages, one module each, plus the model and formats they share.

Each stage module declares ``STAGE`` (name, config dataclass, input roles, build function) and runs
standalone with ``python -m stages.<module>``. This file imports nothing: a stage's code digest covers
the package's ``__init__`` and must not pull in every other stage.
"""
