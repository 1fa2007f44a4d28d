"""N seeds of one config, then a table of the seeds and the one-sided Welch test against a baseline.

Each seed is one pipeline subflow (train.seed varied; tokenize is shared through the store, and a seed
already in the store is not retrained). The seeds run one after another: each one is a whole training
run that wants every GPU of the box. With ``baseline_keys`` (eval or compliance keys of the reference
config's seeds), the table ends with the challenge's test: is the gain over the baseline larger than
``threshold_nats`` at p < ``alpha``? Each row carries the seed's TTT gain (eval's no-TTT diagnostic), and a seed whose
score is an outlier against the best seed is flagged with the likely knob (golf/seed_stability.py: PR #1886's
warm-start TTT collapse).

    golf deploy && prefect deployment run golf-seeds/seeds --params '{"seeds": [1337, 42, 2025]}'
"""

from __future__ import annotations

from golf.prefect_env import configure_prefect

configure_prefect()

from prefect import flow  # noqa: E402  (the environment must be set before prefect is imported)
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402

from artifacts import ArtifactStore  # noqa: E402
from artifacts.store import default_root  # noqa: E402
from flows.pipeline import DEFAULT_CONFIG, pipeline_flow  # noqa: E402
from golf.config import PipelineConfig  # noqa: E402
from golf.reruns import check_seeds, format_seeds, seeds_summary, with_seed  # noqa: E402
from golf.seed_stability import OUTLIER_BPB  # noqa: E402
from golf.submit import ALPHA, THRESHOLD_NATS  # noqa: E402

DEFAULT_SEEDS = [1337, 42, 2025]  # three seeds: what reviewers ask for before a claimed gain is accepted


@flow(name="golf-seeds", log_prints=True)
def seeds_flow(config: PipelineConfig = DEFAULT_CONFIG, seeds: list[int] = DEFAULT_SEEDS,  # noqa: B006 (never mutated)
               baseline_keys: list[str] | None = None, threshold_nats: float = THRESHOLD_NATS, alpha: float = ALPHA,
               store_root: str = "", outlier_bpb: float = OUTLIER_BPB) -> dict:
    """Run the pipeline once per seed, then tabulate the seeds and test them against the baseline runs.

    Args:
        config: every stage's settings; train.seed is replaced by each seed in turn
        seeds: the training seeds, one pipeline run each
        baseline_keys: eval or compliance keys of the reference config's seeds (at least 2), or none
        threshold_nats: the gain over the baseline to beat, nats per token (the challenge: 0.005)
        alpha: one-sided significance level (the challenge: 0.01)
        store_root: the artifact store, shared by every worker ('' = $GOLF_STORE, else ./golf-store)
        outlier_bpb: a seed this much worse than the best seed (after what its no-TTT score explains) is flagged,
            with the knob likely behind it (PR #1886's TTT collapse was +0.05 BPB on 2 of 3 seeds)
    """
    store_root = store_root or str(default_root())
    store = ArtifactStore(store_root)
    check_seeds(seeds, baseline_keys or [], store)
    keys = []
    for seed in seeds:
        summaries = pipeline_flow.with_options(flow_run_name=f"seed-{seed}")(
            config=with_seed(config, seed), store_root=store_root)
        keys.append(summaries[-1]["key"])
    summary = seeds_summary(store, keys, baseline_keys or [], threshold_nats, alpha, outlier_bpb)
    create_table_artifact(key="golf-seeds", table=[{k: str(v) for k, v in r.items()} for r in summary["rows"]],
                          description=f"{len(seeds)} seeds: val_bpb {summary['mean_val_bpb']:.6f} "
                                      f"+- {summary['std_val_bpb']:.6f}")
    if summary["comparison"]:
        create_markdown_artifact(key="golf-seeds-welch", markdown=f"```\n{summary['comparison']}\n```",
                                 description="one-sided Welch test against the baseline")
    flagged = [r for r in summary["rows"] if r.get("outlier")]
    if flagged:
        create_markdown_artifact(key="golf-seeds-outliers", markdown="\n".join(
            f"- seed {r['seed']}: {r['outlier']}" for r in flagged), description=f"{len(flagged)} outlier seed(s)")
    print(format_seeds(summary))
    return summary
