"""The command line every stage module gets: ``python -m stages.<module> --input ROLE=KEY --set FIELD=VALUE``.

It runs one stage against the store, without Prefect, and prints the resulting manifest summary.
"""

from __future__ import annotations

import argparse
import json
import sys

from artifacts import Stage


def stage_main(stage: Stage, argv: list[str] | None = None) -> None:
    from artifacts import ArtifactStore, StoreError, run_stage
    from artifacts.store import StoreWriteError
    from .config import ConfigError, apply_overrides, preset
    from stages.docs import DataError
    from stages.shards import ShardError

    p = argparse.ArgumentParser(prog=f"python -m stages.{stage.module.rsplit('.', 1)[-1]}",
                                description=f"Run the {stage.name} stage alone.")
    p.add_argument("--store", default=None, help="artifact store root (default: $GOLF_STORE or ./golf-store)")
    p.add_argument("--preset", default="tiny", help="take this preset's config for the stage as the base")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a config field")
    p.add_argument("--input", action="append", default=[], metavar="ROLE=KEY",
                   help=f"input artifacts: {', '.join(stage.inputs) or 'none'}")
    p.add_argument("--force", action="store_true", help="rebuild even if the artifact exists")
    a = p.parse_args(argv)
    from .cli import setup_logging
    setup_logging()
    try:
        store = ArtifactStore(a.store)
        cfg = apply_overrides(preset(a.preset), [f"{stage.name}.{s}" for s in a.set])
        inputs = {}
        for item in a.input:
            role, sep, key = item.partition("=")
            if not sep or role not in stage.inputs:
                raise ConfigError(f"--input expects ROLE=KEY with ROLE in: {', '.join(stage.inputs)}")
            inputs[role] = store.get(key)
        res = run_stage(stage, getattr(cfg, stage.name), inputs, store, force=a.force)
    except (ConfigError, StoreError, DataError, ShardError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except StoreWriteError as e:  # the disk refused a write (full, read-only): one line, as golf run says it
        print(f"error: {e}", file=sys.stderr)
        sys.exit(4)
    import os
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(res.summary(), indent=2, default=str))
