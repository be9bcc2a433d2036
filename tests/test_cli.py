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
    from openapi_spec_validator import validate

    validate(spec)  # an object schema defaulting to null once failed it


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
        unauthorized = subprocess.run([str(SERVICE_BIN), "sessions", "list", "--url", server.url],
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


def test_version():
    result = subprocess.run([str(SERVICE_BIN), "--version"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stdout.strip() == "optim-service 0.1.0"


def test_client_flags_anywhere_a_limit_and_quiet_on_a_broken_pipe():
    server = ServerProcess("--store", "memory", env={"OPTIM_API_KEYS": "sk-cli"})
    try:
        for _ in range(30):
            httpx.post(f"{server.url}/v1/sessions", headers={"Authorization": "Bearer sk-cli"},
                       json={"optimizer": {"type": "sgd"}, "params": [1.0]})
        env = {"PATH": "/usr/bin:/bin"}
        for args in (["--url", server.url, "--api-key", "sk-cli", "sessions", "list"],
                     ["sessions", "--url", server.url, "list", "--api-key", "sk-cli"],
                     ["sessions", "list", "--url", server.url, "--api-key", "sk-cli"]):
            listed = subprocess.run([str(SERVICE_BIN), *args], capture_output=True, text=True, timeout=60, env=env)
            assert listed.returncode == 0, listed.stderr
            assert len(listed.stdout.splitlines()) == 31  # a header and 30 sessions
        limited = subprocess.run([str(SERVICE_BIN), "sessions", "list", "--limit", "7", "--url", server.url,
                                  "--api-key", "sk-cli"], capture_output=True, text=True, timeout=60, env=env)
        assert len(limited.stdout.splitlines()) == 8
        piped = subprocess.run(f"'{SERVICE_BIN}' sessions list --url {server.url} --api-key sk-cli | head -n 1",
                               shell=True, capture_output=True, text=True, timeout=60, env=env)
        assert piped.stdout.startswith("id") and piped.stderr == ""
    finally:
        server.stop()


def test_a_bad_configuration_is_one_line_and_exit_2_before_serving():
    for args, words in ((["--store", "sqlite://somehost/x.db"], "names a host"),
                        (["--store", "postgres://db/x"], "unsupported store URL"),
                        (["--store", "sqlite:///"], "names no file")):
        result = subprocess.run([str(SERVICE_BIN), "serve", *args], capture_output=True, text=True, timeout=30)
        assert result.returncode == 2 and words in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    result = subprocess.run([str(SERVICE_BIN), "serve"], capture_output=True, text=True, timeout=30,
                            env={"OPTIM_PORT": "eighty", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2 and result.stderr.startswith("optim-service: OPTIM_PORT:")


def test_sqlite_urls_mean_what_they_say_and_the_start_names_the_store(tmp_path):
    absolute = tmp_path / "abs.db"
    server = ServerProcess("--store", f"sqlite:{absolute}")
    try:
        assert absolute.exists()
        logs = server.logs()
        assert f"store sqlite:{absolute} answers" in logs and "kernels ready" in logs
    finally:
        server.stop()
    server = ServerProcess("--store", "redis://:hunter2@127.0.0.1:1/0")  # nothing listens there
    try:
        assert httpx.get(f"{server.url}/readyz").status_code == 503
        logs = server.logs()
        assert "redis://:***@127.0.0.1:1/0 does not answer" in logs and "hunter2" not in logs
    finally:
        server.stop()


def test_sessions_list_shows_the_verdict_and_watch_follows_steps():
    server = ServerProcess("--store", "memory")
    try:
        theta = [1.0, -1.0]
        sid = httpx.post(f"{server.url}/v1/sessions", json={"optimizer": {"type": "sgd", "lr": 2.5},
                                                            "dtype": "float64", "params": theta}).json()["id"]

        def step():
            nonlocal theta
            answer = httpx.post(f"{server.url}/v1/sessions/{sid}/step",
                                json={"gradients": theta, "loss": sum(x * x for x in theta) / 2})
            theta = answer.json()["params"]

        for _ in range(12):
            step()
        env = {"OPTIM_URL": server.url, "PATH": "/usr/bin:/bin"}
        listed = subprocess.run([str(SERVICE_BIN), "sessions", "list"], capture_output=True, text=True, env=env,
                                timeout=60)
        assert "verdict" in listed.stdout.splitlines()[0] and "diverging" in listed.stdout
        watch = subprocess.Popen([str(SERVICE_BIN), "sessions", "watch", sid, "--interval", "0.2"], env=env,
                                 stdout=subprocess.PIPE, text=True)
        try:
            lines = [watch.stdout.readline() for _ in range(14)]  # the header, 12 steps, the verdict
            step()
            lines.append(watch.stdout.readline())
        finally:
            watch.terminate()
            watch.wait(10)
        assert lines[0].split()[0] == "step" and [ln.split()[0] for ln in lines[1:13]] == [str(i) for i in range(1, 13)]
        assert "verdict: diverging" in lines[13] and lines[14].split()[0] == "13"
    finally:
        server.stop()
