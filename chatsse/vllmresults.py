"""A run in the layout of ``vllm bench serve --save-result --save-detailed``.

The keys are those vLLM writes (``vllm/benchmarks/serve.py``, ``main_async`` and
``benchmark``, commit 009e6d4a), so a ``chatsse load --save-detailed`` file and a vLLM
result file can be read by the same code. What the values mean here:

- setup: ``date`` (``%Y%m%d-%H%M%S``), ``backend`` / ``endpoint_type`` (``openai-chat``,
  vLLM's name for chat completions; ``chatsse`` and ``openai-responses`` for the other two
  protocols, which vLLM lacks), ``label``, ``model_id``, ``tokenizer_id`` (``None``: the
  client counts tokens from the server's usage, it has no tokenizer), ``num_prompts``
  (``requests``, or the requests sent in a duration-bound run), ``request_rate`` (``"inf"``
  for a closed loop, whose users are vLLM's ``--request-rate inf --max-concurrency
  <users>``), ``burstiness`` (1.0 for Poisson and closed loop, ``"inf"`` for constant gaps,
  vLLM's limit), ``max_concurrency``.
- totals and rates: ``duration`` is the window the rates divide by, and the rates count
  the requests completed inside it (:mod:`chatsse.loadmetrics`); in a request-bound run
  that is vLLM's benchmark duration and every request. ``request_goodput`` is vLLM's,
  from send (``None`` without an SLO).
- statistics: ``mean_/median_/std_/p50_/p90_/p95_/p99_`` ``ttft``, ``tpot``, ``itl``,
  ``e2el`` in ms over completed requests (``None`` for an empty series, where vLLM writes
  0); with a ``max_concurrency`` cap also ``client_queue_time`` (the slot wait, every
  completed request) and, in an open loop, ``e2el_including_client_queue``.
- per-request arrays, in request id (send) order: ``input_lens`` (prompt tokens from the
  server's usage, ``None`` when it sent none), ``output_lens`` (0 for a failed request,
  as vLLM), ``ttfts`` and ``latencies`` (0.0 where not measured, vLLM's defaults),
  ``itls``, ``start_times`` (seconds since the run's start; vLLM writes raw
  ``perf_counter`` values, which mean nothing outside their process), ``queue_times``
  (slot waits), ``generated_texts`` (the reply when the target collected it, else ``""``),
  ``errors`` (``""`` when ok).
- peaks: ``max_output_tokens_per_s`` (the busiest 1-second bucket from the first send,
  completed requests' tokens at their events' arrival) and ``max_concurrent_requests``
  (most completed requests open at once, half-open ``[sent, end)`` as vLLM).

Not written: ``rtfx`` (speech models), the speculative-decoding, diffusion and probe keys
(read from a vLLM server's metrics), ``rps_change_events`` (vLLM's stepped ramp-up).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chatsse.loadmetrics import SLO, RequestRecord, Stats, ms_keys, timeline

if TYPE_CHECKING:
    from chatsse.loadgen import LoadTestResult

__all__ = ["save_vllm_results", "vllm_result"]

_BACKENDS = {"openai": "openai-chat", "chatsse": "chatsse", "responses": "openai-responses"}


def _peak_concurrency(records: Sequence[RequestRecord]) -> int:
    steps = sorted([(r.sent, 1) for r in records] + [(r.end or r.sent, -1) for r in records])
    level = peak = 0
    for _, step in steps:  # an end sorts before a start at the same time: half-open intervals
        level += step
        peak = max(peak, level)
    return peak


def vllm_result(result: LoadTestResult, slo: SLO | None = None) -> dict[str, Any]:
    """The run as vLLM's result dict (see the module docstring); ``slo`` defaults to the run's."""
    config, records = result.config, result.records
    summary = result.summary(slo)
    done = [r for r in records if r.ok]
    closed = config.rate is None
    cap = config.max_concurrency
    if closed:
        cap = config.concurrency if cap is None else min(cap, config.concurrency)
    if closed or config.arrival == "poisson":
        burstiness: float | str = 1.0
    elif config.arrival == "constant":
        burstiness = "inf"
    else:
        burstiness = config.burstiness
    rate = config.rate
    out: dict[str, Any] = {
        "date": time.strftime("%Y%m%d-%H%M%S", time.localtime(result.wall_start)),
        "endpoint_type": _BACKENDS.get(result.target["protocol"], result.target["protocol"]),
        "backend": _BACKENDS.get(result.target["protocol"], result.target["protocol"]),
        "label": config.label,
        "model_id": result.target.get("model"),
        "tokenizer_id": None,
        "num_prompts": config.requests if config.requests is not None else len(records),
        "request_rate": "inf" if rate is None or rate == float("inf") else rate,
        "burstiness": burstiness,
        "max_concurrency": cap,
        "duration": summary.duration,
        "completed": summary.completed,
        "failed": summary.failed,
        "total_input_tokens": summary.total_input_tokens,
        "total_output_tokens": summary.total_output_tokens,
        "request_throughput": summary.request_throughput,
        "request_goodput": summary.goodput_from_send if summary.slo is not None else None,
        "output_throughput": summary.output_token_throughput,
        "total_token_throughput": summary.total_token_throughput,
        "input_lens": [r.prompt_tokens for r in records],
        "output_lens": [r.tokens if r.ok else 0 for r in records],
        "ttfts": [r.ttft or 0.0 for r in records],
        "itls": [r.itls for r in records],
        "latencies": [r.e2e or 0.0 for r in records],
        "start_times": [r.sent - result.start for r in records],
        "queue_times": [r.slot_wait for r in records],
        "generated_texts": [r.text or "" for r in records],
        "errors": [r.error or "" for r in records],
        "max_output_tokens_per_s": max((rate for _, rate, _ in timeline(done, bucket=1.0)), default=0.0),
        "max_concurrent_requests": _peak_concurrency(done),
    }
    for name, stats in (("ttft", summary.ttft), ("tpot", summary.tpot), ("itl", summary.itl)):
        out.update(ms_keys(name, stats))
    out.update(ms_keys("e2el", summary.e2e))
    if config.max_concurrency is not None:
        out.update(ms_keys("client_queue_time", Stats.of(r.slot_wait for r in done)))
        if not closed and rate != float("inf"):
            waited = Stats.of(v for r in done if (v := r.e2e_with_wait) is not None)
            out.update(ms_keys("e2el_including_client_queue", waited))
    return out


def save_vllm_results(results: Sequence[LoadTestResult], path: str | Path, slo: SLO | None = None) -> None:
    """One run: one JSON object, as ``--save-result``; several (a sweep): one object per
    line, as vLLM's ``--append-result`` writes them."""
    lines = [json.dumps(vllm_result(r, slo)) for r in results]
    Path(path).write_text("\n".join(lines) + "\n")
