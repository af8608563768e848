"""The metrics daemon and the router's metrics on a real cluster (``launch cluster``), as traffic flows.

Two emulated engines, primary + standby routers and the daemon, all started by the launcher on
OS-assigned ports. The tests scrape the daemon, the primary and the standby (its admin port) before and
after requests and check that the metrics the issue lists exist and move; ``launch tail --type
decision`` must print the routers' decisions. Waits are bounded polls; nothing asserts on timing.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.launched import launched_cluster

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(90)

Samples = dict[str, list[tuple[dict[str, str], float]]]


class Info:
    def __init__(self, cfile: Path, logs: Path) -> None:
        self.cfile, self.logs = cfile, logs
        self.data: dict[str, Any] = json.loads(cfile.read_text())

    def role(self, role: str) -> dict[str, Any]:
        return next(p for p in self.data["processes"] if p["role"] == role)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Info]:
    tmp = tmp_path_factory.mktemp("metricsd")
    cfile, logs = tmp / "cluster.json", tmp / "logs"
    args = [
        "--instances", "2", "--port", "0",
        "--cluster-file", str(cfile), "--log-dir", str(logs),
        "--time-scale", "0.05", "--max-total-tokens", "20000",
    ]  # fmt: skip
    with launched_cluster(args, logs, timeout=60) as (_proc, lines):
        assert any(ln.startswith("metrics: http://") for ln in lines), "the table names the daemon's URL"
        yield Info(cfile, logs)


async def scrape(s: aiohttp.ClientSession, url: str) -> Samples:
    async with s.get(url + "/metrics", timeout=aiohttp.ClientTimeout(total=5)) as r:
        assert r.status == 200
        text = await r.text()
    out: Samples = defaultdict(list)
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            out[smp.name].append((dict(smp.labels), float(smp.value)))
    return out


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items()))


def per(samples: Samples, name: str, label: str) -> dict[str, float]:
    return {lab[label]: v for lab, v in samples.get(name, []) if label in lab}


async def poll(pred: Callable[[], Awaitable[bool]], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def generate(s: aiohttp.ClientSession, url: str, i: int, max_new: int = 6, stream: bool = True) -> int:
    body = {
        "input_ids": list(range(1, 400)) + [2000 + i] * 30,
        "sampling_params": {"max_new_tokens": max_new, "ignore_eos": True},
        "stream": stream,
    }
    async with s.post(url + "/generate", json=body, timeout=aiohttp.ClientTimeout(total=60)) as r:
        await r.read()
        return r.status


async def test_daemon_and_router_metrics_move_with_traffic(cluster: Info) -> None:
    router_url = cluster.data["router"]
    daemon_url = cluster.data["metrics"]
    assert cluster.role("metrics")["endpoints"]["http"] == daemon_url
    standby_admin = cluster.role("router-standby")["endpoints"]["admin"]
    async with aiohttp.ClientSession() as s:

        async def instances_up() -> bool:
            d = await scrape(s, daemon_url)
            return per(d, "lmetric_instance_up", "instance") == {"0": 1.0, "1": 1.0}

        await poll(instances_up, "both instances up in the daemon")
        d0, r0, sb0 = await scrape(s, daemon_url), await scrape(s, router_url), await scrape(s, standby_admin)
        assert total(d0, "lmetric_primaries") == 1
        assert (
            total(r0, "router_role", role="primary") == 1 and total(sb0, "router_role", role="standby") == 1
        )

        # A long request: the load gauges and the in-flight counts go up while it runs.
        long = asyncio.create_task(generate(s, router_url, -1, max_new=6000))

        async def busy() -> bool:
            d = await scrape(s, daemon_url)
            r = await scrape(s, router_url)
            return (
                total(d, "lmetric_instance_running_requests") >= 1
                and total(d, "lmetric_router_inflight_requests") >= 1
                and total(r, "router_instance_inflight") >= 1
            )

        await poll(busy, "running requests and requests in flight to show")
        statuses = await asyncio.gather(*(generate(s, router_url, i, stream=i % 2 == 0) for i in range(12)))
        assert statuses == [200] * 12
        assert await long == 200

        async def moved() -> bool:
            d = await scrape(s, daemon_url)
            return (
                total(d, "lmetric_router_decisions_total") - total(d0, "lmetric_router_decisions_total") >= 13
                and total(d, "lmetric_router_requests_finished_total")
                - total(d0, "lmetric_router_requests_finished_total")
                >= 13
                and total(d, "lmetric_instance_running_requests") == 0
            )

        await poll(moved, "the daemon to count every decision and end")
        d1, r1, sb1 = await scrape(s, daemon_url), await scrape(s, router_url), await scrape(s, standby_admin)

    def grew(a: Samples, b: Samples, name: str, **labels: str) -> bool:
        return total(b, name, **labels) > total(a, name, **labels)

    # daemon: per instance
    assert grew(d0, d1, "lmetric_instance_kv_events_total", type="BlockStored")
    assert grew(d0, d1, "lmetric_instance_kv_blocks_total", type="BlockStored")
    assert grew(d0, d1, "lmetric_instance_frames_total", kind="LoadReport")
    assert max(per(d1, "lmetric_instance_cached_blocks", "instance").values()) > 0
    assert set(per(d1, "lmetric_instance_kv_usage_ratio", "instance")) == {"0", "1"}
    assert set(per(d1, "lmetric_instance_queued_prefill_tokens", "instance")) == {"0", "1"}
    assert set(per(d1, "lmetric_instance_waiting_requests", "instance")) == {"0", "1"}
    assert all(v >= 0 for v in per(d1, "lmetric_instance_heartbeat_age_seconds", "instance").values())
    # daemon: per router
    assert grew(d0, d1, "lmetric_router_decision_score_count")
    assert grew(d0, d1, "lmetric_router_prompt_tokens_total")
    assert total(d1, "lmetric_router_new_tokens_total") < total(
        d1, "lmetric_router_prompt_tokens_total"
    )  # reuse
    assert total(d1, "lmetric_router_index_blocks") > 0 and total(d1, "lmetric_router_up") == 2
    assert set(per(d1, "lmetric_router_decisions_total", "instance")) <= {"0", "1"}
    # router: request metrics and the gap fillers
    assert grew(r0, r1, "router_requests_total", status="200")
    assert grew(r0, r1, "router_ttft_seconds_count") and grew(r0, r1, "router_e2e_latency_seconds_count")
    assert grew(r0, r1, "router_decision_score_count", policy="lmetric")
    assert grew(r0, r1, "router_prompt_tokens_total") and grew(r0, r1, "router_matched_tokens_total")
    assert total(r1, "router_instance_routable") == 2
    assert grew(r0, r1, "router_decision_frames_published_total", type="RequestRouted")
    # standby: mirrored the primary's decisions
    assert (
        total(sb1, "router_mirrored_decisions_total", kind="routed")
        - total(sb0, "router_mirrored_decisions_total", kind="routed")
        >= 13
    )
    assert total(sb1, "router_primary_heartbeat_age_seconds") >= 0


def test_tail_prints_decisions(cluster: Info) -> None:
    tail = subprocess.Popen(
        [
            sys.executable, "-m", "launch", "tail", "--cluster", str(cluster.cfile),
            "--type", "decision", "--json", "--count", "4", "--timeout", "40",
        ],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip

    async def traffic() -> None:
        # A SUB socket only receives what is published after it connected (slow joiner), and the tail's
        # start-up takes seconds on a loaded machine: keep sending until the tail has its four records.
        async with aiohttp.ClientSession() as s:
            for i in range(400):
                if tail.poll() is not None:
                    return
                assert await generate(s, cluster.data["router"], 100 + i, stream=False) == 200
                await asyncio.sleep(0.1)

    asyncio.run(traffic())
    out, _ = tail.communicate(timeout=45)
    recs = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    assert len(recs) == 4 and all(r["type"] == "decision" for r in recs), recs
    routed = [r for r in recs if r["event"] == "RequestRouted"]
    assert routed and all(r["policy"] == "lmetric" and r["prompt_tokens"] == 429 for r in routed)
    assert all(r["instance"] in ("0", "1") and len(r["block_hashes"]) == r["blocks"] for r in routed)
