"""The artifact store and the stage runner: keys, manifests, atomic commits."""

from .runner import Stage, StageContext, StageResult, plan_key, run_stage
from .store import (Artifact, ArtifactCorrupt, ArtifactNotFound, ArtifactStore, StoreError,
                    compute_key)

__all__ = ["Artifact", "ArtifactCorrupt", "ArtifactNotFound", "ArtifactStore", "Stage", "StageContext",
           "StageResult", "StoreError", "compute_key", "plan_key", "run_stage"]
