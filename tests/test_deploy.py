"""The Kubernetes manifests (launch/deploy/kubernetes), validated offline.

* Every object, as written and as ``kubectl kustomize`` renders the base and the SGLang overlay, is
  checked against the Kubernetes API's own JSON schemas (strict: no unknown field) with the
  ``kubernetes-validate`` package, for an older and the newest Kubernetes it ships. ServiceMonitor is a
  Prometheus Operator CRD whose schema is not in that package and is not vendored here: it is checked by
  hand below instead (apiVersion, the fields it uses, and that it selects a Service with that port).
* The objects fit together: every Service selects a pod template that has its target ports; the routers
  never share a node; the router Role may use Leases, and each router pod runs the Lease elector sidecar
  (router/k8s_elector.py) with the router as a standby it promotes; the router and daemon agent lists match the engine
  replicas; the dashboard ConfigMap carries docs/grafana/lmetric-router.json byte for byte.

Rendering needs ``kubectl`` (its built-in kustomize); without it those tests are skipped and the raw files
are still checked.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")
kv = pytest.importorskip("kubernetes_validate")

from agents.agent.config import parse_args as agent_args  # noqa: E402
from agents.engine.config import parse_args as engine_args  # noqa: E402
from router.cli import parse_args as router_args  # noqa: E402
from router.k8s_elector import parse_args as elector_args  # noqa: E402
from router.metricsd import parse_args as metricsd_args  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "launch" / "deploy" / "kubernetes"
BASE, SGLANG = DEPLOY / "base", DEPLOY / "overlays" / "sglang"
K8S_VERSIONS = ("1.30.0", kv.latest_version())
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}  # no schema shipped: checked by hand


def raw_objects() -> list[dict[str, Any]]:
    kust = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for f in kust["resources"]:
        docs += [d for d in yaml.safe_load_all((BASE / f).read_text()) if d]
    return docs


def render(path: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not on PATH")
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def validate_all(objs: list[dict[str, Any]]) -> None:
    for o in objs:
        if (o["apiVersion"], o["kind"]) in CRDS:
            check_service_monitor(o, objs)
            continue
        for v in K8S_VERSIONS:
            try:
                kv.validate(o, v, strict=True)
            except kv.ValidationError as exc:
                raise AssertionError(
                    f"{o['kind']}/{o['metadata']['name']} against Kubernetes {v}: {exc}"
                ) from None


def check_service_monitor(sm: dict[str, Any], objs: list[dict[str, Any]]) -> None:
    assert set(sm) <= {"apiVersion", "kind", "metadata", "spec"}
    spec = sm["spec"]
    assert set(spec) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    sel = spec["selector"]["matchLabels"]
    services = [
        o for o in objs if o["kind"] == "Service" and sel.items() <= o["metadata"].get("labels", {}).items()
    ]
    assert services, f"ServiceMonitor {sm['metadata']['name']} selects no Service"
    for ep in spec["endpoints"]:
        assert set(ep) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
        assert ep["path"].startswith("/")
        for s in services:
            assert ep["port"] in {p["name"] for p in s["spec"]["ports"]}, (
                sm["metadata"]["name"],
                s["metadata"]["name"],
            )


def pod_templates(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        o["metadata"]["name"]: o["spec"]["template"]
        for o in objs
        if o["kind"] in ("StatefulSet", "Deployment")
    }


def check_wiring(objs: list[dict[str, Any]]) -> None:
    templates = pod_templates(objs)
    for s in (o for o in objs if o["kind"] == "Service"):
        sel = s["spec"]["selector"]
        pods = [t for t in templates.values() if sel.items() <= t["metadata"]["labels"].items()]
        assert pods, f"Service {s['metadata']['name']} selects no pod template"
        names = {p.get("name") for t in pods for c in t["spec"]["containers"] for p in c.get("ports", [])}
        numbers = {
            p["containerPort"] for t in pods for c in t["spec"]["containers"] for p in c.get("ports", [])
        }
        for p in s["spec"]["ports"]:
            target = p.get("targetPort", p["port"])
            assert target in names or target in numbers, (s["metadata"]["name"], p)
    router = next(o for o in objs if o["kind"] == "StatefulSet" and o["metadata"]["name"] == "router")
    anti = router["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    assert anti[0]["topologyKey"] == "kubernetes.io/hostname"
    assert router["spec"]["replicas"] == 2
    assert router["spec"]["template"]["spec"]["serviceAccountName"] == "router"
    role = next(o for o in objs if o["kind"] == "Role")
    lease = next(r for r in role["rules"] if "leases" in r["resources"])
    assert lease["apiGroups"] == ["coordination.k8s.io"] and {"get", "create", "update"} <= set(
        lease["verbs"]
    )
    binding = next(o for o in objs if o["kind"] == "RoleBinding")
    assert (
        binding["roleRef"]["name"] == role["metadata"]["name"] and binding["subjects"][0]["name"] == "router"
    )
    engine = next(o for o in objs if o["kind"] == "StatefulSet" and o["metadata"]["name"] == "engine")
    agents = next(o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "lmetric-cluster")
    want = [f"tcp://engine-{k}.engine:5600" for k in range(engine["spec"]["replicas"])]
    assert agents["data"]["AGENTS"].split() == want
    sidecar = [c["name"] for c in engine["spec"]["template"]["spec"]["containers"]]
    assert sidecar == ["engine", "agent"]
    # the Lease decides: every router runs as a standby told to take over by its elector sidecar, and
    # the pod is Ready (selected by Service `router`) only while both the router serves and the elector
    # holds the Lease
    containers = {c["name"]: c for c in router["spec"]["template"]["spec"]["containers"]}
    assert set(containers) == {"router", "elector"}
    script = " ".join(containers["router"]["args"])
    assert (
        "--takeover external" in script and "--exit-when-fenced" in script and "--role primary" not in script
    )
    elector = containers["elector"]
    assert elector["command"] == ["python", "-m", "router.k8s_elector"]
    assert "--lease=router-leader" in elector["args"]
    assert elector["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "elector"}


PARSERS = {
    "agents.engine.server": engine_args,
    "agents.agent": agent_args,
    "router": router_args,
    "router.metricsd": metricsd_args,
    "router.k8s_elector": elector_args,
}


def command_lines(container: dict[str, Any], pod: str, stub_bin: Path) -> list[list[str]]:
    """The ``python -m`` command lines a container runs (its shell script run with ``exec python`` turned
    into ``echo``, so both branches of the routers' role choice show), ``$(VAR)`` filled in. ``python``
    in the script is a stub in ``stub_bin`` that answers "none" (no peer: no name is looked up)."""
    env = {"POD_IP": "10.1.2.3", "POD_NAME": pod, "AGENTS": "tcp://engine-0.engine:5600", "POLICY": "lmetric"}
    cmd = [
        re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a)
        for a in container["command"] + container.get("args", [])
    ]
    if cmd[:2] != ["/bin/sh", "-c"]:
        return [cmd]
    script = cmd[2].replace("exec python -m", "echo -m")
    path = f"{stub_bin}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    out = subprocess.run(
        ["sh", "-c", script], env={**env, "PATH": path}, capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    return [["python", *line.split()] for line in out.stdout.splitlines() if line.startswith("-m ")]


def test_every_command_line_parses(tmp_path: Path) -> None:
    """Each process's flags, as the manifests give them, are accepted by that process's own parser."""
    stub = tmp_path / "python"
    stub.write_text("#!/bin/sh\necho none\n")
    stub.chmod(0o755)
    seen = set()
    for t in pod_templates(raw_objects()).values():
        for c in t["spec"]["containers"]:
            for pod in ("router-0", "router-1"):
                for cmd in command_lines(c, pod, tmp_path):
                    assert cmd[:2] == ["python", "-m"], cmd
                    PARSERS[cmd[2]](cmd[3:])
                    seen.add(cmd[2])
    assert seen == set(PARSERS)


def test_raw_files_validate_and_fit_together() -> None:
    objs = raw_objects()
    validate_all(objs)
    check_wiring(objs)


def test_dashboard_copy_is_the_docs_dashboard() -> None:
    copy = (BASE / "grafana" / "lmetric-router.json").read_bytes()
    assert copy == (ROOT / "docs" / "grafana" / "lmetric-router.json").read_bytes(), (
        "cp docs/grafana/lmetric-router.json launch/deploy/kubernetes/base/grafana/"
    )


def test_rendered_base_validates() -> None:
    objs = render(BASE)
    validate_all(objs)
    check_wiring(objs)
    assert all(o["metadata"].get("namespace") == "lmetric" for o in objs if o["kind"] != "Namespace")
    kinds = sorted({o["kind"] for o in objs})
    assert kinds == sorted(
        {"Namespace", "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Service", "StatefulSet", "Deployment",
         "PodDisruptionBudget", "ServiceMonitor"}
    )  # fmt: skip
    dash = next(
        o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "lmetric-router-dashboard"
    )
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dash["data"]["lmetric-router.json"]) == json.loads(
        (ROOT / "docs" / "grafana" / "lmetric-router.json").read_text()
    )
    images = {c["image"] for t in pod_templates(objs).values() for c in t["spec"]["containers"]}
    assert images == {"lmetric-router:0.1.0"}


def test_rendered_sglang_overlay_validates() -> None:
    objs = render(SGLANG)
    validate_all(objs)
    check_wiring(objs)
    engine = pod_templates(objs)["engine"]["spec"]["containers"]
    assert (
        engine[0]["image"] == "lmetric-router-sglang:0.1.0" and engine[1]["image"] == "lmetric-router:0.1.0"
    )
    assert engine[0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    kv_cfg = next(a for a in engine[0]["args"] if a.startswith("--kv-events-config="))
    assert json.loads(kv_cfg.split("=", 1)[1])["replay_endpoint"] == "tcp://*:5558"
