"""The console script refuses configurations that cannot work, saying why."""

import json
import subprocess

import httpx

from conftest import SERVICE_BIN, ServerProcess


def test_memory_store_refuses_several_workers():
    result = subprocess.run([str(SERVICE_BIN), "serve", "--workers", "2", "--store", "memory"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "memory store" in result.stderr and "sqlite" in result.stderr


def test_help_lists_serve():
    result = subprocess.run([str(SERVICE_BIN), "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "serve" in result.stdout


def test_openapi_writes_the_spec(tmp_path):
    out = tmp_path / "openapi.json"
    result = subprocess.run([str(SERVICE_BIN), "openapi", "-o", str(out)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    spec = json.loads(out.read_text())
    assert spec["openapi"].startswith("3.") and "/v1/sessions/{session_id}/step" in spec["paths"]


def test_sessions_list_show_delete_against_a_live_server():
    server = ServerProcess("--store", "memory", env={"OPTIM_API_KEYS": "sk-cli"})
    try:
        headers = {"Authorization": "Bearer sk-cli"}
        sid = httpx.post(f"{server.url}/v1/sessions", headers=headers,
                         json={"optimizer": {"type": "rmsprop"}, "params": [1.0, 2.0, 3.0]}).json()["id"]
        env = {"OPTIM_URL": server.url, "OPTIM_API_KEY": "sk-cli", "PATH": "/usr/bin:/bin"}

        def cli(*args):
            return subprocess.run([str(SERVICE_BIN), "sessions", *args], capture_output=True, text=True,
                                  timeout=60, env=env)

        listed = cli("list")
        assert listed.returncode == 0 and sid in listed.stdout and "rmsprop" in listed.stdout
        shown = cli("show", sid)
        assert json.loads(shown.stdout)["num_parameters"] == 3
        assert cli("delete", sid).stdout.strip() == f"deleted {sid}"
        missing = cli("show", sid)
        assert missing.returncode == 1 and "404" in missing.stderr and sid in missing.stderr
        unauthorized = subprocess.run([str(SERVICE_BIN), "sessions", "--url", server.url, "list"],
                                      capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
        assert unauthorized.returncode == 1 and "401" in unauthorized.stderr
    finally:
        server.stop()


def test_session_ids_never_look_like_an_option():
    """One token in 64 starts with "-"; 2,000 of them would all miss it with odds of 1 in 10^13."""
    from optim_service.sessions import new_session_id

    ids = [new_session_id() for _ in range(2000)]
    assert not any(i.startswith("-") for i in ids)
    assert len(set(ids)) == len(ids) and all(len(i) == 22 for i in ids)
