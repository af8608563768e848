"""The shipped Grafana dashboard: valid dashboard JSON whose queries name only metrics that exist.

Metric names are taken from real scrapes: a router (primary, decision stream on, in process, no agents)
and the metrics daemon (in process, no agents). prometheus-client lists every family with its ``# TYPE``
line even before it has samples, so the scrape names every metric either can export.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from router.config import RouterConfig
from router.ha import HANode
from router.metricsd import MetricsDaemon, MetricsdConfig
from router.server import RouterServer

pytestmark = pytest.mark.timeout(30)

DASHBOARD = Path(__file__).resolve().parents[1] / "docs" / "grafana" / "lmetric-router.json"
SUFFIXES = {
    "counter": ("", "_total", "_created"),
    "histogram": ("", "_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
}
METRIC = re.compile(r"\b((?:router|lmetric)_[A-Za-z0-9_:]+)")


def exported_names(text: str) -> set[str]:
    """Every sample name a Prometheus text exposition can carry, from its ``# TYPE`` lines."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            names.update(name + s for s in SUFFIXES.get(kind, ("",)))
    return names


async def scrape(url: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        assert r.status == 200
        return await r.text()


async def scraped_names() -> set[str]:
    server = RouterServer(RouterConfig(port=0, warmup_timeout=0))
    node = HANode(server)
    daemon = MetricsDaemon(MetricsdConfig(port=0))
    await node.start()
    await daemon.start()
    try:
        return exported_names(await scrape(server.url)) | exported_names(await scrape(daemon.url))
    finally:
        await daemon.stop()
        await node.stop()


def targets(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) of every query, rows' nested panels included."""
    out = []
    stack = list(dash["panels"])
    while stack:
        p = stack.pop()
        stack.extend(p.get("panels", []))
        out.extend((p["title"], t["expr"]) for t in p.get("targets", []))
    return out


def test_dashboard_is_grafana_json() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert isinstance(dash, dict) and dash["title"] and dash["uid"]
    assert isinstance(dash["schemaVersion"], int)
    panels = dash["panels"]
    assert isinstance(panels, list) and panels
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels:
        assert p["type"] and p["title"] and {"h", "w", "x", "y"} <= set(p["gridPos"])
        if p["type"] != "row":
            assert p["targets"], p["title"]
            refs = [t["refId"] for t in p["targets"]]
            assert len(refs) == len(set(refs)) and all(t["expr"].strip() for t in p["targets"])
    assert {v["name"] for v in dash["templating"]["list"]} >= {"datasource"}


async def test_dashboard_names_only_exported_metrics() -> None:
    names = await scraped_names()
    assert {"router_requests_total", "lmetric_router_decisions_total", "lmetric_instance_up"} <= names
    used = {
        (title, m) for title, expr in targets(json.loads(DASHBOARD.read_text())) for m in METRIC.findall(expr)
    }
    assert len({m for _, m in used}) >= 20
    unknown = sorted((title, m) for title, m in used if m not in names)
    assert not unknown, f"dashboard queries name metrics nobody exports: {unknown}"
