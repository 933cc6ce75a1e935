"""deploy/: the Kubernetes manifests validate offline (built-in kinds against Kubernetes' own schemas
with kubernetes-validate; the LeaderWorkerSet against its CRD's schema, its pod templates as core
kinds), their containers' arguments are the real commands' options, and their probes answer: the
StatefulSet's server and head run here with the manifest's own arguments (addresses, ports and paths
made local) and are probed as the kubelet would. The Dockerfiles are checked for what can be
checked without a container engine (none runs on these machines): what they copy exists, the
stages they copy from are defined, the command they run is the package's."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import jsonschema
import kubernetes_validate
import pytest
import tomllib
import yaml

from llmrpc.cli import head, server
from llmrpc.head.local import read_ready
from llmrpc.head.resolve import check_spec
from tests.namespaces import stop

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
LWS_SCHEMA = Path(__file__).parent / "data" / "leaderworkerset-v1.schema.json"
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())  # LeaderWorkerSet needs 1.26 or later
COMMANDS: dict[str, click.Command] = {"llmrpc-server": server, "llmrpc-head": head}
PREFIX = "llmrpc-head serve listening on "


def documents() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{p.name}:{d['kind']}/{d['metadata']['name']}", d)
        for p in MANIFESTS
        for d in yaml.safe_load_all(p.read_text())
        if d
    ]


def pod_specs(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    spec = doc["spec"]
    if doc["kind"] in ("Deployment", "StatefulSet"):
        yield doc["kind"], spec["template"]
    elif doc["kind"] == "LeaderWorkerSet":
        lwt = spec["leaderWorkerTemplate"]
        yield "leaderTemplate", lwt["leaderTemplate"]
        yield "workerTemplate", lwt["workerTemplate"]


def containers() -> list[tuple[str, dict[str, Any]]]:
    return [(f"{name}:{where}:{c['name']}", c) for name, d in documents() for where, t in pod_specs(d)
            for c in t["spec"]["containers"]]  # fmt: skip


def test_there_are_a_statefulset_and_a_leaderworkerset() -> None:
    kinds = {d["kind"] for _, d in documents()}
    assert {"StatefulSet", "LeaderWorkerSet", "Service", "Deployment"} <= kinds
    services = [d for _, d in documents() if d["kind"] == "Service" and d["spec"].get("clusterIP") == "None"]
    assert services, "the StatefulSet's servers need a headless Service"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_built_in_kinds_validate(version: str) -> None:
    checked = 0
    for _, doc in documents():
        if doc["apiVersion"].startswith("leaderworkerset."):
            for where, template in pod_specs(doc):
                pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": where.lower()},
                                "template": template}  # fmt: skip
                kubernetes_validate.validate(pod_template, version, strict=True)
            for claim in doc["spec"]["leaderWorkerTemplate"].get("volumeClaimTemplates", []):
                kubernetes_validate.validate({"apiVersion": "v1", "kind": "PersistentVolumeClaim", **claim}, version,
                                             strict=True)  # fmt: skip
        else:
            kubernetes_validate.validate(doc, version, strict=True)
        checked += 1
    assert checked == len(documents())


def test_a_broken_manifest_is_refused() -> None:
    """The validation above can fail: a probe with a misspelt field, a port as a list."""
    _, doc = next((n, d) for n, d in documents() if d["kind"] == "StatefulSet")
    bad = json.loads(json.dumps(doc))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["tcpSocket"] = {"prot": "grpc"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)
    lws = next(d for _, d in documents() if d["kind"] == "LeaderWorkerSet")
    wrong = json.loads(json.dumps(lws))
    wrong["spec"]["leaderWorkerTemplate"]["restartPolicy"] = "Always"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(wrong, json.loads(LWS_SCHEMA.read_text()))


def test_the_leaderworkerset_validates_against_its_crd_schema() -> None:
    schema = json.loads(LWS_SCHEMA.read_text())
    lws = [d for _, d in documents() if d["kind"] == "LeaderWorkerSet"]
    assert lws
    for doc in lws:
        jsonschema.validate(doc, schema)
        lwt = doc["spec"]["leaderWorkerTemplate"]
        assert lwt["restartPolicy"] == "RecreateGroupOnPodRestart"
        assert lwt["size"] >= 2
        assert _command(lwt["leaderTemplate"]["spec"]["containers"][0])[:2] == ["llmrpc-head", "serve"]
        assert _command(lwt["workerTemplate"]["spec"]["containers"][0])[0] == "llmrpc-server"


def _command(c: dict[str, Any]) -> list[str]:
    return [*c.get("command", []), *c.get("args", [])]


@pytest.mark.parametrize(("name", "container"), containers(), ids=[n for n, _ in containers()])
def test_containers_run_the_commands_with_their_options(name: str, container: dict[str, Any]) -> None:
    program, *args = _command(container)
    command = COMMANDS[program]
    if isinstance(command, click.Group):
        command = command.commands[args.pop(0)]
    known = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
    options = [a for a in args if a.startswith("-")]
    assert set(options) <= known, f"{name}: {set(options) - known}"
    for i, a in enumerate(args):
        if a == "--rpc-servers":
            for spec in args[i + 1].split(","):
                check_spec(spec)
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container.get(kind)
        if probe is None:
            continue
        action = probe.get("httpGet") or probe.get("tcpSocket")
        assert action is not None, f"{name}: {kind} neither HTTP nor TCP"
        port = ports.get(action["port"], action["port"])
        assert port in ports.values(), f"{name}: {kind} probes a port the container does not declare"
        flag = "--metrics-port" if probe.get("httpGet") and program == "llmrpc-server" else "--port"
        assert args[args.index(flag) + 1] == str(port), f"{name}: {kind} probes {port}, the program listens elsewhere"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _local(args: list[str], values: dict[str, str]) -> list[str]:
    """A container's arguments made to run here: each option in ``values`` takes that value
    (an empty one drops the option)."""
    out: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        takes_value = i + 1 < len(args) and not args[i + 1].startswith("-")
        if a in values:
            if values[a]:
                out += [a, values[a]]
            i += 2 if takes_value else 1
            continue
        out.append(a)
        i += 1
    return out


def _probe(container: dict[str, Any], ports: dict[int, int]) -> list[str]:
    """Probe the container as the kubelet does (its ports mapped to ``ports``); what failed."""
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    failed = []
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container.get(kind)
        if probe is None:
            continue
        if "tcpSocket" in probe:
            port = ports[named.get(probe["tcpSocket"]["port"], probe["tcpSocket"]["port"])]
            try:
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
            except OSError as e:
                failed.append(f"{kind}: {e}")
        else:
            get = probe["httpGet"]
            port = ports[named.get(get["port"], get["port"])]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{get['path']}", timeout=10) as r:
                    if not 200 <= r.status < 400:
                        failed.append(f"{kind}: HTTP {r.status}")
            except (OSError, urllib.error.HTTPError) as e:
                failed.append(f"{kind}: {e}")
    return failed


def test_the_statefulsets_probes_answer(tiny_models: dict[str, str], tmp_path: Path) -> None:
    """The server and the head of statefulset.yaml, run here with their own arguments, answer
    every probe (the head's with an API key set: the kubelet sends none)."""
    docs = {d["kind"]: d for name, d in documents() if name.startswith("statefulset.yaml")}
    server_c = docs["StatefulSet"]["spec"]["template"]["spec"]["containers"][0]
    head_c = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    grpc_port, http_port, metrics_port = _free_port(), _free_port(), _free_port()
    server_args = _local(server_c["args"], {"--host": "127.0.0.1", "--port": str(grpc_port), "--data-port": "0",
                                            "--cache-dir": str(tmp_path / "slices"),
                                            "--metrics-port": str(metrics_port)})  # fmt: skip
    server_proc = subprocess.Popen([sys.executable, "-m", "llmrpc.cli", "server", *server_args, "--no-calibrate"],
                                   stdout=subprocess.PIPE, text=True)  # fmt: skip
    head_proc = None
    try:
        address = read_ready(server_proc, 60)
        assert not _probe(server_c, {50052: grpc_port, 9100: metrics_port})
        head_args = _local(head_c["args"], {"--model": tiny_models["Q8_0"], "--rpc-servers": address,
                                            "--min-servers": "1", "--connect-timeout": "30", "--host": "127.0.0.1",
                                            "--port": str(http_port), "--ctx-size": "128", "--parallel": "1",
                                            "-v": ""})  # fmt: skip
        env = os.environ | {"LLMRPC_API_KEY": "k8s-key"}
        head_proc = subprocess.Popen([sys.executable, "-m", "llmrpc.cli", "head", *head_args], env=env,
                                     stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert head_proc.stdout is not None
        line = head_proc.stdout.readline()
        assert line.startswith(PREFIX), line
        assert not _probe(head_c, {8080: http_port})
        with pytest.raises(urllib.error.HTTPError, match="401"):  # the API itself still wants the key
            urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v1/models", timeout=10)
    finally:
        if head_proc is not None:
            stop(head_proc)
        stop(server_proc)


# -- Dockerfiles ----------------------------------------------------------------------------------
DOCKERFILES = sorted((ROOT / "deploy" / "docker").glob("Dockerfile*"))


def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


@pytest.mark.parametrize("path", DOCKERFILES, ids=[p.name for p in DOCKERFILES])
def test_dockerfiles_copy_what_exists_and_run_the_package(path: Path) -> None:
    steps = _instructions(path)
    stages = {m.group(1) for op, rest in steps if op == "FROM" and (m := re.search(r"\bAS\s+(\S+)", rest, re.I))}
    declared = {rest.split("=")[0] for op, rest in steps[: [op for op, _ in steps].index("FROM")] if op == "ARG"}
    for op, rest in steps:
        if op == "FROM":
            used = set(re.findall(r"\$\{(\w+)\}", rest))
            assert used <= declared, f"FROM uses {used - declared}, not declared before the first FROM"
        if op == "COPY":
            words = rest.split()
            flags = [w for w in words if w.startswith("--")]
            sources = [w for w in words if not w.startswith("--")][:-1]
            source_stage = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None)
            if source_stage is not None:
                assert source_stage in stages
            else:
                for s in sources:
                    assert (ROOT / s).exists(), f"COPY {s}: no such file in the repository"
    cmd = json.loads(next(rest for op, rest in reversed(steps) if op == "CMD"))
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert cmd[0] in scripts
    ctx = COMMANDS[cmd[0]].make_context(cmd[0], cmd[1:])  # the real command parses its arguments
    assert ctx.params["port"] == 50052
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored
