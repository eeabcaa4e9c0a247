"""``--save-detailed``: a run written with the keys ``vllm bench serve`` writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chatsse.loadgen import LoadConfig, LoadTestResult
from chatsse.loadmetrics import SLO, RequestRecord
from chatsse.vllmresults import save_vllm_results, vllm_result

# The keys of vllm/benchmarks/serve.py (vllm-project/vllm, commit 009e6d4a): main_async's
# result_json (date ... max_concurrency), benchmark()'s result dict, and the statistics
# process_one_metric adds for ttft, tpot, itl, e2el (mean_, median_, std_, p<P>_ at the
# default --metric-percentiles 99) and, with --max-concurrency, client_queue_time and
# e2el_including_client_queue. Left out: rtfx (speech models only).
VLLM_SETUP_KEYS = [
    "date",
    "endpoint_type",
    "backend",
    "label",
    "model_id",
    "tokenizer_id",
    "num_prompts",
    "request_rate",
    "burstiness",
    "max_concurrency",
]
VLLM_RESULT_KEYS = [
    "duration",
    "completed",
    "failed",
    "total_input_tokens",
    "total_output_tokens",
    "request_throughput",
    "request_goodput",
    "output_throughput",
    "total_token_throughput",
    "input_lens",
    "output_lens",
    "ttfts",
    "itls",
    "latencies",
    "start_times",
    "queue_times",
    "generated_texts",
    "errors",
    "max_output_tokens_per_s",
    "max_concurrent_requests",
]
VLLM_STAT_KEYS = [
    f"{stat}_{metric}_ms"
    for metric in ("ttft", "tpot", "itl", "e2el", "client_queue_time", "e2el_including_client_queue")
    for stat in ("mean", "median", "std", "p99")
]


def record(request_id: int, sent: float, tokens_at: list[float], **extra: object) -> RequestRecord:
    fields: dict[str, object] = {
        "request_id": request_id,
        "user_id": 0,
        "turn": 0,
        "intended_start": sent,
        "sent": sent,
        "headers_at": sent + 0.005,
        "first_token_at": tokens_at[0] if tokens_at else None,
        "token_times": tokens_at,
        "end": (tokens_at[-1] if tokens_at else sent) + 0.01,
        "events": len(tokens_at) + 2,
        "tokens": len(tokens_at),
        "status": 200,
        "prompt_tokens": 12,
        **extra,
    }
    return RequestRecord(**fields)  # type: ignore[arg-type]


def result(config: LoadConfig) -> LoadTestResult:
    records = [
        record(0, 10.0, [10.1, 10.2, 10.3], text="a reply"),
        record(1, 10.5, [10.9, 11.0], intended_start=10.2, slot_wait=0.3),
        record(2, 11.0, [11.1], error="stream_error:engine_error"),
        record(3, 11.5, [], status=503, error="http_503", prompt_tokens=None),
    ]
    target = {"protocol": "openai", "url": "http://x/v1/chat/completions", "model": "m"}
    return LoadTestResult(config, target, records, start=10.0, end=12.0, wall_start=1.7e9)


def test_every_vllm_key_is_written() -> None:
    config = LoadConfig(requests=4, rate=2.0, max_concurrency=2, slo=SLO(ttft=0.2))
    out = vllm_result(result(config))
    missing = [k for k in VLLM_SETUP_KEYS + VLLM_RESULT_KEYS + VLLM_STAT_KEYS if k not in out]
    assert missing == []
    assert json.loads(json.dumps(out)) == out  # plain JSON


def test_values_follow_vllm_conventions() -> None:
    config = LoadConfig(requests=4, rate=2.0, max_concurrency=2, slo=SLO(ttft=0.2))
    out = vllm_result(result(config))
    assert (out["backend"], out["endpoint_type"], out["model_id"]) == ("openai-chat", "openai-chat", "m")
    assert (out["request_rate"], out["max_concurrency"], out["burstiness"], out["num_prompts"]) == (
        2.0,
        2,
        1.0,
        4,
    )
    assert (out["completed"], out["failed"]) == (2, 2)
    assert out["duration"] == pytest.approx(2.0)
    assert out["request_throughput"] == pytest.approx(1.0)
    assert out["output_throughput"] == pytest.approx(2.5)  # 3 + 2 tokens in 2 s
    assert out["total_token_throughput"] == pytest.approx(14.5)  # and 24 prompt tokens
    # vLLM's goodput is from send: request 0's TTFT (0.1 s) is within 200 ms, request 1's
    # (0.4 s) is not: one good request in 2 s.
    assert out["request_goodput"] == pytest.approx(0.5)
    assert out["output_lens"] == [3, 2, 0, 0]  # failed requests count 0, as vLLM
    assert out["input_lens"] == [12, 12, 12, None]
    assert out["ttfts"] == pytest.approx([0.1, 0.4, 0.1, 0.0])
    assert out["latencies"] == pytest.approx([0.31, 0.51, 0.11, 0.01])
    assert out["start_times"] == pytest.approx([0.0, 0.5, 1.0, 1.5])
    assert out["queue_times"] == [0.0, 0.3, 0.0, 0.0]
    assert out["itls"] == [pytest.approx([0.1, 0.1]), pytest.approx([0.1]), [], []]
    assert out["generated_texts"] == ["a reply", "", "", ""]
    assert out["errors"] == ["", "", "stream_error:engine_error", "http_503"]
    assert out["mean_ttft_ms"] == pytest.approx(250.0)
    assert out["p99_client_queue_time_ms"] == pytest.approx(297.0)  # over the completed two
    assert out["mean_e2el_including_client_queue_ms"] == pytest.approx((310 + 810) / 2)
    assert out["max_concurrent_requests"] == 1
    # The first second from the first send holds request 0's three tokens and request 1's first.
    assert out["max_output_tokens_per_s"] == 4.0


def test_a_closed_loop_is_vllms_infinite_rate_with_its_users_as_concurrency() -> None:
    out = vllm_result(result(LoadConfig(requests=4, concurrency=3)))
    assert (out["request_rate"], out["max_concurrency"], out["burstiness"]) == ("inf", 3, 1.0)
    assert out["request_goodput"] is None  # no SLO
    assert "mean_client_queue_time_ms" not in out  # no cap
    constant = vllm_result(result(LoadConfig(requests=4, rate=2.0, arrival="constant")))
    assert constant["burstiness"] == "inf"


def test_a_sweep_is_written_one_run_per_line(tmp_path: Path) -> None:
    run = result(LoadConfig(requests=4, rate=2.0))
    path = tmp_path / "vllm.json"
    run.save_detailed(path)
    assert json.loads(path.read_text())["completed"] == 2
    save_vllm_results([run, run], path)
    lines = path.read_text().splitlines()
    assert [json.loads(line)["label"] for line in lines] == ["rate 2/s", "rate 2/s"]
