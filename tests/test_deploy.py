"""The container files: docker-compose.yml validated by docker-compose itself, and the service started
locally with the exact command and environment the compose file gives a replica, against real Redis."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import redis
import yaml

from conftest import ServerProcess

ROOT = Path(__file__).parents[1]


def compose_config(env_file: str) -> subprocess.CompletedProcess:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.fail("docker-compose is not installed; make test installs it (scripts/system-deps)")
    env = {"PATH": os.environ["PATH"]}  # nothing of this shell's OPTIM_* leaks in
    return subprocess.run([binary, "-f", str(ROOT / "docker-compose.yml"), "--env-file", env_file, "config"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def compose() -> dict:
    """The configuration with the keys of .env.example, as a user's .env gives them."""
    result = compose_config(str(ROOT / ".env.example"))
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_compose_refuses_to_publish_the_port_without_api_keys(compose, tmp_path):
    (tmp_path / ".env").write_text("# no keys\n")
    result = compose_config(str(tmp_path / ".env"))
    assert result.returncode != 0 and "set OPTIM_API_KEYS in .env" in result.stderr
    assert all(svc["environment"]["OPTIM_API_KEYS"] == "sk-replace-me-with-a-long-random-key"
               for svc in replicas(compose).values())


def replicas(compose: dict) -> dict[str, dict]:
    return {name: svc for name, svc in compose["services"].items() if svc.get("image") == "optim-service:latest"}


def test_compose_runs_two_replicas_on_append_only_redis_behind_a_balancer(compose):
    services = compose["services"]
    assert all("healthcheck" in svc for svc in services.values())
    redis_cmd = services["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes"
    optims = replicas(compose)
    assert len(optims) >= 2
    stores = {svc["environment"]["OPTIM_STORE"] for svc in optims.values()}
    assert stores == {"redis://redis:6379/0"}
    assert all(svc["environment"]["OPTIM_WORKERS"] == "1" for svc in optims.values())  # scale by replicas
    assert all(svc["depends_on"]["redis"]["condition"] == "service_healthy" for svc in optims.values())
    nginx = (ROOT / "deploy/nginx.conf").read_text()
    assert set(re.findall(r"server (optim-\d):8000", nginx)) == set(optims)
    assert set(services["lb"]["depends_on"]) == set(optims)
    assert services["lb"]["ports"][0]["published"] == 8000


def test_dockerfile_is_slim_non_root_with_a_healthcheck():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", dockerfile, re.M)
    assert re.search(r"^USER optim$", dockerfile, re.M)
    assert "HEALTHCHECK" in dockerfile and "/healthz" in dockerfile


def test_replicas_start_with_the_compose_command_and_environment(compose, redis_url):
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    client.close()
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (.*)$", (ROOT / "Dockerfile").read_text(), re.M).group(1))
    assert entrypoint == ["optim-service", "serve"]
    servers = []
    try:
        for svc in replicas(compose).values():
            env = {k: str(v).replace("redis://redis:6379/0", redis_url) for k, v in svc["environment"].items()}
            env["OPTIM_PORT"] = "{port}"  # the one change: a free port instead of 8000
            servers.append(ServerProcess(*svc["command"], "--port", "{port}", env=env, replace_port=True))
            env["OPTIM_PORT"] = str(servers[-1].port)
            healthcheck = svc["healthcheck"]["test"]
            assert healthcheck[0] == "CMD"
            probe = subprocess.run([sys.executable, *healthcheck[2:]], env={**os.environ, **env}, timeout=10)
            assert probe.returncode == 0  # the healthcheck finds the port the setting gives
        key = {"Authorization": f"Bearer {env['OPTIM_API_KEYS']}"}
        sid = httpx.post(f"{servers[0].url}/v1/sessions", headers=key,
                         json={"optimizer": {"type": "adam"}, "params": [1.0]}).json()["id"]
        for i in range(4):
            r = httpx.post(f"{servers[i % 2].url}/v1/sessions/{sid}/step", headers=key, json={"gradients": [1.0]})
            assert r.status_code == 200 and r.json()["step"] == i + 1
        ready = [httpx.get(f"{s.url}/readyz").json() for s in servers]
        assert ready == [{"status": "ready"}] * len(servers)
    finally:
        for s in servers:
            s.stop()


def test_the_kubernetes_manifests_validate_against_kubernetes_schemas():
    """No cluster runs here: every document in deploy/kubernetes/ is checked against the API schemas of
    the oldest and newest Kubernetes versions kubernetes-validate knows, strictly (no unknown field)."""
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    docs = [(path.name, doc) for path in sorted((ROOT / "deploy/kubernetes").glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]
    kinds = {doc["kind"] for _, doc in docs}
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "Secret"} <= kinds
    for version in ("1.29.0", latest_version()):
        for name, doc in docs:
            kubernetes_validate.validate(doc, version, strict=True)  # raises, naming the field, if not
    deployment = next(doc for _, doc in docs if doc["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    env = {e["name"]: e for e in container["env"]}
    assert env["OPTIM_STORE"]["valueFrom"]["secretKeyRef"]["name"] == "optim-service"  # the URL from a Secret
    with pytest.raises(kubernetes_validate.ValidationError):  # the validator does refuse a broken manifest
        kubernetes_validate.validate({**deployment, "spec": {**deployment["spec"], "replicas": "three"}},
                                     latest_version(), strict=True)
