"""bench/lockstep.py's bookkeeping: a failed request fails the run, the ratio says what it is."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

from protos import agent_pb2


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    saved_env = dict(os.environ)  # the module pins BLAS threads when imported
    try:
        import bench.lockstep as module
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
    yield module


class FlakyStub:
    """Answers every request with one token, except request `-1`, which fails."""

    def Generate(self, request: agent_pb2.GenerateRequest, timeout: float) -> Any:
        if request.request_id.endswith("-1"):
            raise RuntimeError("link lost")
        return [agent_pb2.GenerateResponse(token=7, logits=b"\0\0\0\0", finished=True)]


def test_a_failed_request_fails_the_run(bench: ModuleType) -> None:
    batch = [(1, 2)] * 3
    with pytest.raises(bench.BenchFailed, match=r"1 of 3 requests.*link lost"):
        bench.timed_batch(FlakyStub(), "d", "b0", batch, 1)


def test_all_requests_returned(bench: ModuleType) -> None:
    class Good(FlakyStub):
        def Generate(self, request: agent_pb2.GenerateRequest, timeout: float) -> Any:
            return [agent_pb2.GenerateResponse(token=7, logits=b"\0\0\0\0", finished=True)]

    _, results = bench.timed_batch(Good(), "d", "b0", [(1,)] * 3, 1)
    assert sorted(results) == [0, 1, 2]


def test_report_names_what_the_ratio_divides_by(
    bench: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    hops = {k: 0.1 for k in ("hop_p50_ms", "hop_p99_ms", "round_trip_p50_ms", "round_trip_p99_ms")}
    rates = {"reference": {"one": 10.0, "batch": 20.0}, "1_stages": {"one": 5.0, "batch": 10.0}}
    out = bench.report(
        {"hops": hops, "tokens_per_s": rates, "identical": True},
        argparse.Namespace(tokens=4, reps=1),
    )
    assert out["ratio_vs_reference"] == {"1_stages": {"one": 0.5, "batch": 0.5}}
    assert out["reference_kind"] == "in-process single executor"
    assert "in-process single executor" in capsys.readouterr().out


def test_report_states_the_tls_cost_against_the_plaintext_pair(
    bench: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    hops = {k: 0.2 for k in ("hop_p50_ms", "hop_p99_ms", "round_trip_p50_ms", "round_trip_p99_ms")}
    plain_hops = {k: v / 2 for k, v in hops.items()}
    rates = {"reference": {"one": 10.0, "batch": 20.0}, "1_stages": {"one": 5.0, "batch": 10.0}}
    plain = {"hops": plain_hops, "tokens_per_s": {"1_stages": {"one": 10.0, "batch": 15.0}}}
    out = bench.report(
        {"hops": hops, "tokens_per_s": rates, "identical": True, "plaintext": plain},
        argparse.Namespace(tokens=4, reps=1),
    )
    assert out["transport"] == "mutual TLS"
    assert out["tls_cost_ratio"]["hop_p50"] == 2.0
    assert out["tls_cost_ratio"]["1_stages_one_tokens_per_s"] == 2.0
    assert out["tls_cost_ratio"]["1_stages_batch_tokens_per_s"] == 1.5
    assert out["plaintext"]["hop_p50_ms"] == 0.1
    assert "TLS cost: hop p50 x2.00" in capsys.readouterr().out


def test_report_compares_the_framed_hop_with_the_raw_round_trip_of_the_same_security(
    bench: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    def hops(p50: float, rt: float) -> dict[str, float]:
        return {
            "hop_p50_ms": p50,
            "hop_p99_ms": p50,
            "round_trip_p50_ms": rt,
            "round_trip_p99_ms": rt,
        }

    rates = {"reference": {"one": 10.0, "batch": 20.0}, "1_stages": {"one": 5.0, "batch": 10.0}}
    result = {
        "hops": hops(0.2, 0.4),
        "tokens_per_s": rates,
        "identical": True,
        "plaintext": {"hops": hops(0.15, 0.3), "tokens_per_s": {"1_stages": rates["1_stages"]}},
        "framed": {
            "hops": hops(0.09, 0.12),  # TLS: x1.8 of raw TLS, x4.5 of raw TCP
            "tokens_per_s": {"1_stages": {"one": 8.0, "batch": 10.0}},
            "plaintext": {
                "hops": hops(0.03, 0.04),
                "tokens_per_s": {"1_stages": rates["1_stages"]},
            },
        },
        "raw": {
            "tcp": {"round_trip_p50_ms": 0.02, "round_trip_p99_ms": 0.03},
            "tls": {"round_trip_p50_ms": 0.05, "round_trip_p99_ms": 0.06},
        },
    }
    out = bench.report(result, argparse.Namespace(tokens=4, reps=1))
    framed = out["framed"]
    assert framed["vs_raw"]["tls"] == {"hop_p50": 1.8, "round_trip_p50": 2.4}
    assert framed["vs_raw"]["plaintext"] == {"hop_p50": 1.5, "round_trip_p50": 2.0}
    assert framed["within_2x"] is True
    assert framed["ratio_vs_reference"]["1_stages"] == {"one": 0.8, "batch": 0.5}
    assert out["grpc_vs_raw"]["tls"]["hop_p50"] == 4.0
    result["framed"]["plaintext"]["hops"] = hops(0.05, 0.06)  # x2.5 of raw TCP
    assert (
        bench.report(result, argparse.Namespace(tokens=4, reps=1))["framed"]["within_2x"] is False
    )
    assert "TLS vs raw TLS, plaintext vs raw TCP" in capsys.readouterr().out
