"""``scripts/bench_loadclient.py --quick``: both workloads run with 1 and 2 client processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "scripts" / "bench_loadclient.py"


def test_quick_bench_measures_the_client_with_one_and_two_processes(tmp_path: Path) -> None:
    output = tmp_path / "build" / "bench_loadclient.json"  # a directory that does not exist yet
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATSSE_")}
    process = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=110,
        env=env,
    )
    assert process.returncode == 0, process.stderr
    report = json.loads(output.read_text())
    plan = report["plan"]
    expected_events = {
        "paced": 2 * plan["streams"] * (plan["tokens"] + 2),
        "bursts": plan["burst_requests"] * (plan["burst_tokens"] + 2),
    }
    for workload, runs in report["runs"].items():
        assert [run["processes"] for run in runs] == [1, 2], workload
        for run in runs:
            assert run["failed"] == 0, (workload, run["errors"])
            assert run["events"] == expected_events[workload]  # every event of every reply
            assert len(run["client_cpu_share"]) == len(run["loop_lag_p99_ms"]) == run["processes"]
            assert run["client_cpu_s"] > 0
            assert run["events_per_client_cpu_s"] == run["events"] / run["client_cpu_s"]
    for row in (
        "events per client CPU-second",
        "event-loop lag p99 (ms)",
        "client flagged as the bottleneck",
    ):
        assert row in process.stdout
