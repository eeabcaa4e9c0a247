"""A chaos run: the soak's mixed traffic against a 4-worker gunicorn chatsse while faults are
injected one after another (``make chaos``): a worker killed with SIGKILL (SQLite, Redis),
Redis restarted, the SQLite disk filled; what it measures is chatsse/chaos.py's docstring.

Usage: ``python scripts/chaos.py [--quick] [--faults kill_worker,redis_restart,disk_full]
[--stores sqlite,redis] [--output build/chaos.json]``. Exit code 1 when a fault lost a
completed turn or did not recover.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from chatsse.chaos import FAULTS, QUICK, ChaosConfig, run_chaos, summary_text


def _log(began: float) -> Callable[[str], None]:
    def log(line: str) -> None:
        print(f"[{time.monotonic() - began:6.1f} s] {line}", file=sys.stderr, flush=True)

    return log


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="every fault, briefly (about a minute): tests and CI"
    )
    parser.add_argument("--faults", default=",".join(FAULTS), help="comma-separated subset of the faults")
    parser.add_argument("--stores", default="sqlite,redis", help="comma-separated: sqlite, redis")
    parser.add_argument("--concurrency", type=int, help="simulated users (50)")
    parser.add_argument("--output", help="save the report as JSON")
    args = parser.parse_args(argv)
    faults = tuple(f for f in args.faults.split(",") if f)
    stores = tuple(s for s in args.stores.split(",") if s)
    if set(faults) - set(FAULTS) or set(stores) - {"sqlite", "redis"}:
        parser.error(f"faults are {', '.join(FAULTS)}; stores are sqlite, redis")
    config = dataclasses.replace(QUICK if args.quick else ChaosConfig(), faults=faults, stores=stores)
    if args.concurrency is not None:
        config = dataclasses.replace(config, concurrency=args.concurrency)
    report = run_chaos(config, log=_log(time.monotonic()))
    print(summary_text(report))
    if args.output:
        path = Path(args.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
