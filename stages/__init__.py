"""The pipeline's six stages, one module each: tokenize, train, average, quantize, evaluate (eval), compliance.

Each declares ``STAGE`` (name, config dataclass, input roles, build function): a thin layer that reads its input
artifacts, calls the core (``gpt``) and writes its output artifact. No stage imports another stage, ``golf`` or
``flows``. This file imports nothing: a stage's code digest covers it and must not pull in every other stage.
"""
