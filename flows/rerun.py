"""Partial runs from an artifact in the store: quantize-only (from a train or average key) and eval-only.

Everything upstream of the given key (tokenize, train, ...) is read from its lineage in the store, so
eval and compliance score against exactly the data and weights the key was built from. The stages run
through the pipeline's own task, so keys and caching are the same as in ``golf run``.

    golf deploy && prefect deployment run golf-quantize-only/quantize-only --param source_key=average-165f
"""

from __future__ import annotations

from golf.prefect_env import configure_prefect

configure_prefect()

from prefect import flow  # noqa: E402  (the environment must be set before prefect is imported)

from artifacts import ArtifactStore  # noqa: E402
from artifacts.store import default_root  # noqa: E402
from flows.pipeline import DEFAULT_CONFIG, run_stages  # noqa: E402
from golf.reruns import stages_after, start_from  # noqa: E402
from stages.average import AverageConfig  # noqa: E402
from stages.compliance import ComplianceConfig  # noqa: E402
from stages.evaluate import EvalConfig  # noqa: E402
from stages.quantize import QuantizeConfig  # noqa: E402


@flow(name="golf-quantize-only", log_prints=True)
def quantize_only_flow(source_key: str = "", quantize: QuantizeConfig = DEFAULT_CONFIG.quantize,
                       eval: EvalConfig = DEFAULT_CONFIG.eval, compliance: ComplianceConfig = DEFAULT_CONFIG.compliance,
                       average: AverageConfig = DEFAULT_CONFIG.average, until: str = "compliance",
                       store_root: str = "", force: list[str] | None = None) -> list[dict]:
    """Quantize (then eval and compliance) the weights of a train or average artifact already in the store.

    Args:
        source_key: an average key (quantize its weights) or a train key (average first); a unique prefix works
        quantize: the quantize stage's settings
        eval: the eval stage's settings (the seq_len and stride of the original run keep scores comparable)
        compliance: the compliance stage's settings
        average: used only when source_key is a train artifact
        until: the last stage to run: quantize, eval or compliance
        store_root: the artifact store, shared by every worker ('' = $GOLF_STORE, else ./golf-store)
        force: stages to rebuild even when cached
    """
    store_root = store_root or str(default_root())
    stage, keys = start_from(ArtifactStore(store_root), source_key, ("train", "average"), "quantize-only")
    configs = {"average": average, "quantize": quantize, "eval": eval, "compliance": compliance}
    return run_stages(stages_after(stage, until), configs, keys, store_root, force)


@flow(name="golf-eval-only", log_prints=True)
def eval_only_flow(quantize_key: str = "", eval: EvalConfig = DEFAULT_CONFIG.eval,
                   compliance: ComplianceConfig = DEFAULT_CONFIG.compliance, until: str = "compliance",
                   store_root: str = "", force: list[str] | None = None) -> list[dict]:
    """Score a quantize artifact already in the store (then check it with compliance).

    Args:
        quantize_key: the quantize artifact to score; a unique prefix works
        eval: the eval stage's settings
        compliance: the compliance stage's settings
        until: the last stage to run: eval or compliance
        store_root: the artifact store, shared by every worker ('' = $GOLF_STORE, else ./golf-store)
        force: stages to rebuild even when cached
    """
    store_root = store_root or str(default_root())
    stage, keys = start_from(ArtifactStore(store_root), quantize_key, ("quantize",), "eval-only")
    configs = {"eval": eval, "compliance": compliance}
    return run_stages(stages_after(stage, until), configs, keys, store_root, force)
