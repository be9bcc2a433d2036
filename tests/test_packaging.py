"""The artefacts a user installs elsewhere: a wheel of each Python package, installed into a clean
venv, and the JavaScript client's npm pack, installed into a clean folder, each driving a real
server through its public names."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import httpx
import pytest

from conftest import free_port

ROOT = Path(__file__).parents[1]


def run(*args, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def clean_venv(tmp_path_factory) -> tuple[Path, dict]:
    """A venv holding only the two wheels; their dependencies come from the test's own environment
    on PYTHONPATH (installing numpy, numba and torch again would be downloads, not a test of ours)."""
    out = tmp_path_factory.mktemp("wheels")
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
        str(ROOT), str(ROOT / "clients" / "python"))
    wheels = sorted(p.name for p in out.glob("*.whl"))
    assert [w.split("-")[0] for w in wheels] == ["optim_client", "optim_service"], wheels
    venv = tmp_path_factory.mktemp("venv")
    run(sys.executable, "-m", "venv", str(venv))
    run(str(venv / "bin" / "pip"), "install", "-q", "--no-deps", "--no-index", *(str(out / w) for w in wheels))
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "PYTHONPATH": sysconfig.get_paths()["purelib"],
           "HOME": os.environ.get("HOME", "/tmp")}
    return venv, env


def test_the_wheels_install_and_serve_from_a_clean_venv(clean_venv, tmp_path):
    venv, env = clean_venv
    where = run(str(venv / "bin" / "python"), "-c",
                "import optim_service, optim_client; print(optim_service.__file__, optim_client.__file__)",
                env=env, cwd=tmp_path).stdout.split()
    assert all(path.startswith(str(venv)) for path in where), where  # not the checkout's editable install
    port = free_port()
    server = subprocess.Popen([str(venv / "bin" / "optim-service"), "serve", "--port", str(port), "--store",
                               f"sqlite:///{tmp_path}/wheel.db"], env=env, cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        script = ("import numpy as np\nfrom optim_client import OptimClient\n"
                  f"with OptimClient({url!r}) as c:\n"
                  "    s = c.create_session({'w': np.zeros(3)}, optimizer='sgd', lr=0.5)\n"
                  "    print(s.step({'w': np.ones(3)})['w'].tolist())\n")
        assert run(str(venv / "bin" / "python"), "-c", script, env=env, cwd=tmp_path).stdout.strip() == \
            "[-0.5, -0.5, -0.5]"
    finally:
        server.terminate()
        server.wait(10)


def test_the_npm_pack_installs_into_a_clean_folder(server, tmp_path):
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail("npm is not installed; make test installs it (scripts/system-deps)")
    pack = json.loads(run(npm, "pack", str(ROOT / "clients" / "js"), "--pack-destination", str(tmp_path),
                          "--json").stdout)
    files = {f["path"] for f in pack[0]["files"]}
    assert files == {"index.js", "index.d.ts", "package.json"}, files
    project = tmp_path / "app"
    project.mkdir()
    (project / "package.json").write_text('{"name": "app", "version": "1.0.0", "type": "module", "private": true}')
    run(npm, "install", "--offline", "--no-audit", "--no-fund", str(tmp_path / pack[0]["filename"]), cwd=project)
    (project / "main.mjs").write_text(
        'import { OptimClient } from "optim-client";\n'
        f'const client = new OptimClient("{server.url}");\n'
        'const s = await client.createSession({ params: new Float64Array([1, 2]), optimizer: { type: "sgd", lr: 0.5 } });\n'
        'const p = await s.step(new Float64Array([1, 1]));\n'
        'console.log(Array.from(p).join(","));\n'
        'await s.delete();\n')
    assert run(shutil.which("node"), "main.mjs", cwd=project).stdout.strip() == "0.5,1.5"
