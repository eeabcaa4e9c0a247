"""A soak run: a 4-worker gunicorn chatsse under mixed traffic for ten minutes (``make soak``);
what it sends and checks is chatsse/soak.py's docstring.

Usage: ``python scripts/soak.py [--quick] [--duration S] [--store sqlite|redis] [--output build/soak.json]``
Exit code 1 when a check fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from chatsse.soak import QUICK, SoakConfig, run_soak, summary_text


def _log(began: float) -> Callable[[str], None]:
    def log(line: str) -> None:
        print(f"[{time.monotonic() - began:6.1f} s] {line}", file=sys.stderr, flush=True)

    return log


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a short run (about 30 s): tests and CI")
    parser.add_argument("--duration", type=float, help="seconds of traffic after the warm-up (600)")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up traffic (30)")
    parser.add_argument("--store", choices=("sqlite", "redis"), default="sqlite")
    parser.add_argument("--concurrency", type=int, help="simulated users (50)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="save the report as JSON")
    args = parser.parse_args(argv)
    config = QUICK if args.quick else SoakConfig()
    changes = {
        name: value
        for name in ("duration", "warmup", "concurrency", "seed", "store")
        if (value := getattr(args, name)) is not None
    }
    config = dataclasses.replace(config, **changes)
    report = run_soak(config, log=_log(time.monotonic()))
    print(summary_text(report))
    if args.output:
        path = Path(args.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
