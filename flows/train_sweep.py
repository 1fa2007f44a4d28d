"""The training sweep: a grid over config fields (train ones above all), every point trained, averaged, quantized
and evaluated through the store, ending in a table of bytes and val_bpb; ``fit`` picks the best val_bpb under
the cap (PR #281's manual weight-decay sweep as one run).

Each point is one pipeline subflow, one after another: each is a whole training run that wants every GPU of the
box (as in flows/seeds.py). tokenize is shared through the store, and a point already in the store is not
retrained. Over-cap points are quantized and scored all the same (their bytes are the sweep's answer), and a
point that fails (diverged, say) gets a row with its error instead of stopping the others.

    golf sweep-train --preset tiny --grid train.muon_weight_decay=0.0,0.5,2.0 --fit
    prefect deployment run golf-train-sweep/train-sweep --params '{"grid": {"train.muon_weight_decay": [0.04, 0.042]}}'
"""

from __future__ import annotations

from golf.prefect_env import configure_prefect

configure_prefect()

from prefect import flow  # noqa: E402  (the environment must be set before prefect is imported)
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402

from artifacts.store import default_root  # noqa: E402
from flows.pipeline import DEFAULT_CONFIG, pipeline_flow  # noqa: E402
from golf.config import PipelineConfig, config_from_dict  # noqa: E402
from golf.sweeps import format_sweep, grid_points, run_sweep  # noqa: E402

TABLE_KEY = "golf-train-sweep"
MODES = ("table", "fit")


@flow(name="golf-train-sweep", log_prints=True)
def train_sweep_flow(config: PipelineConfig = DEFAULT_CONFIG, grid: dict[str, list] | None = None,
                     mode: str = "fit", cap_bytes: int = 0, store_root: str = "") -> dict:
    """Train, quantize and evaluate every point of a grid over config fields; in fit mode, pick the best that fits.

    Args:
        config: every stage's settings; each point replaces the grid's fields
        grid: config key -> values, e.g. {"train.muon_weight_decay": [0.040, 0.042, 0.045]}; every combination runs
        mode: table (every point's bytes and val_bpb) | fit (also pick the lowest val_bpb whose artifact fits)
        cap_bytes: the size the chosen artifact must fit (0 = the config's quantize.cap_bytes, the challenge's 16 MB)
        store_root: the artifact store, shared by every worker ('' = $GOLF_STORE, else ./golf-store)
    """
    if isinstance(config, dict):  # called directly, not through Prefect's parameter validation
        config = config_from_dict(PipelineConfig, config)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    cap = cap_bytes or config.quantize.cap_bytes
    points = grid_points(config, grid or {})  # every point checked before the first one trains
    store_root = store_root or str(default_root())
    out = run_sweep(points, cap, mode == "fit", lambda label, point: pipeline_flow.with_options(
        flow_run_name=f"point {label}"[:100])(config=point, store_root=store_root, until="eval"))
    rows, chosen = out["rows"], out["chosen"]
    create_table_artifact(key=TABLE_KEY, table=[{k: "" if v is None else str(v) for k, v in r.items()} for r in rows],
                          description=f"training sweep over {', '.join(grid or {})}: {len(rows)} points")
    text = format_sweep(rows, chosen, cap if mode == "fit" else None)
    if mode == "fit":
        create_markdown_artifact(key=f"{TABLE_KEY}-fit", markdown=f"```\n{text}\n```",
                                 description=f"fit: {chosen['point'] if chosen else 'no point fits the cap'}")
    print(text)
    return out
