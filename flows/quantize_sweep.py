"""The quantize sweep: several quantize configs over one trained model, quantize + eval mapped in parallel.

tokenize, train and average run through the same stage task as the pipeline (cache hits when the
store has them); quantize is mapped over the configs as parallel Prefect tasks, each followed by its
eval; one table artifact compares them (bytes, val_bpb, the quantization gap). A config that fails
(over the cap, say) gets a row with its error instead of stopping the others.

    golf sweep-quantize --preset tiny --variant "bits=6 clip=sd:12.85" --variant "method=gptq bits=6"
"""

from __future__ import annotations

from golf.prefect_env import configure_prefect

configure_prefect()

from prefect import flow, unmapped  # noqa: E402  (the environment must be set before prefect is imported)
from prefect.artifacts import create_table_artifact  # noqa: E402

import dataclasses  # noqa: E402

from artifacts.runner import code_digest  # noqa: E402
from flows.pipeline import DEFAULT_CONFIG, run_stages, stage_task  # noqa: E402
from golf.config import PipelineConfig, config_from_dict  # noqa: E402
from golf.pipeline import STAGE_BY_NAME, ship_eval  # noqa: E402
from stages.quantize import QuantizeConfig  # noqa: E402
from shipping.assemble import shipped_code  # noqa: E402

UPSTREAM = ("tokenize", "train", "average")
TABLE_KEY = "golf-quantize-sweep"


def sweep_row(label: str, q: dict | None, ev: dict | None, error: str | None) -> dict:
    qm = q["metrics"] if q else {}
    em = ev["metrics"] if ev else {}
    return {"config": label, "scheme": qm.get("scheme", ""), "artifact_bytes": qm.get("artifact_bytes"),
            "weights_bytes": qm.get("weights_bytes"), "code_bytes": qm.get("code_bytes"), "fits": qm.get("fits"),
            "val_bpb": em.get("val_bpb"), "pre_quant_val_bpb": em.get("pre_quant_val_bpb"),
            "quant_gap_bpb": em.get("quant_gap_bpb"), "calibration_seconds": qm.get("calibration_seconds"),
            "quantize_key": q["key"] if q else None, "quantize_cached": q["cached"] if q else None,
            "eval_cached": ev["cached"] if ev else None, "error": error}


def format_table(rows: list[dict]) -> str:
    """The sweep as aligned text: one line per config."""
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)
    lines = [f"{'config':<40}{'artifact bytes':>15}{'val_bpb':>10}{'gap':>10}  scheme / error"]
    for r in rows:
        lines.append(f"{r['config'][:39]:<40}{num(r['artifact_bytes'], ','):>15}{num(r['val_bpb'], '.4f'):>10}"
                     f"{num(r['quant_gap_bpb'], '+.5f'):>10}  {r['error'] or r['scheme']}")
    return "\n".join(lines)


@flow(name="golf-quantize-sweep", log_prints=True)
def quantize_sweep_flow(config: PipelineConfig = DEFAULT_CONFIG, store_root: str = "",
                        quantize_configs: list[QuantizeConfig] | None = None,
                        labels: list[str] | None = None) -> dict:
    """Upstream once (from the store when it can be), then quantize + eval for every quantize config.

    Args:
        config: every stage's settings; tokenize, train, average and eval come from here (a dict is accepted too)
        store_root: the artifact store, shared by every worker ('' = $GOLF_STORE, else ./golf-store)
        quantize_configs: the quantize settings to compare, one parallel task each (dicts are accepted too)
        labels: a name per quantize config for the table (default: config 0, config 1, ...)
    """
    from artifacts.store import default_root
    if isinstance(config, dict):  # called directly, not through Prefect's parameter validation
        config = config_from_dict(PipelineConfig, config)  # refuses unknown keys before anything runs
    quantize_configs = [config_from_dict(QuantizeConfig, q, f"quantize_configs[{i}]") if isinstance(q, dict) else q
                        for i, q in enumerate(quantize_configs or [])]
    if not quantize_configs:
        raise ValueError("quantize_configs is empty: give at least one quantize config to compare")
    if labels is not None and len(labels) != len(quantize_configs):
        raise ValueError(f"{len(labels)} labels for {len(quantize_configs)} quantize configs")
    store_root = store_root or str(default_root())
    labels = labels or [f"config {i}" for i in range(len(quantize_configs))]
    keys: dict[str, str] = {}
    upstream = run_stages(list(UPSTREAM), {name: getattr(config, name) for name in UPSTREAM}, keys, store_root)

    # what parses Python source (the code digests of the stage keys, the shipped-code minifier) runs here, once,
    # before the threads: CPython 3.11's AST constructor is not thread-safe, and Prefect parses in this thread too
    code_digest(STAGE_BY_NAME["quantize"].module)
    code_digest(STAGE_BY_NAME["eval"].module)
    shipped_code()
    q_inputs = {r: keys[r] for r in STAGE_BY_NAME["quantize"].inputs}
    # each quantize counts the train_gpt.py that embeds the eval it is scored by, as golf run does
    quantize_configs = [ship_eval({"quantize": q, "eval": config.eval})["quantize"] for q in quantize_configs]
    q_futures = stage_task.map(unmapped("quantize"), [dataclasses.asdict(q) for q in quantize_configs],
                               unmapped(q_inputs), unmapped(store_root))
    pending = []
    for label, fut in zip(labels, q_futures):
        try:
            q = fut.result()
        except Exception as e:  # one config's failure (over the cap, bad clip) is a row, not the end
            pending.append((label, None, None, f"{type(e).__name__}: {e}"))
            continue
        ev_inputs = {"quantize": q["key"], "average": keys["average"], "tokenize": keys["tokenize"]}
        pending.append((label, q, stage_task.submit("eval", dataclasses.asdict(config.eval), ev_inputs, store_root), None))
    rows = []
    for label, q, ev_future, error in pending:
        ev = None
        if ev_future is not None:
            try:
                ev = ev_future.result()
            except Exception as e:
                error = f"eval: {type(e).__name__}: {e}"
        rows.append(sweep_row(label, q, ev, error))
    create_table_artifact(key=TABLE_KEY, table=[{k: "" if v is None else str(v) for k, v in r.items()} for r in rows],
                          description=f"quantize sweep over average {keys['average']}")
    print(format_table(rows))
    return {"upstream": upstream, "rows": rows}
