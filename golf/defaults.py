"""Names and defaults the ``golf`` command needs to build its parser, in a module that imports nothing heavy.

golf.config builds the presets from the stages' config classes, whose modules import torch (seconds): ``golf
--help`` and the parser read the names from here instead. tests/test_faults_config.py checks that they agree
with golf.config.PRESETS and golf.deployments.
"""

from __future__ import annotations

from pathlib import Path

PRESET_NAMES = ("tiny", "baseline", "record", "pr1886", "pr281")  # the keys of golf.config.PRESETS, in its order
DEFAULT_PRESET = "tiny"
PREFECT_FILE = Path(__file__).resolve().parent.parent / "prefect.yaml"  # the list of deployments
DEFAULT_POOL = "golf"  # the work pool `golf deploy` creates or uses
