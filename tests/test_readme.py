"""Every example in the README runs, as written, against a live server: the curl walk-through, the
Python snippets (SDK and torch drop-in) and the JavaScript one."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"
JS_CLIENT = Path(__file__).parents[1] / "clients" / "js" / "index.js"
DEFAULT_URL = "http://127.0.0.1:8000"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.S)


def walkthrough() -> str:
    section = README.read_text().split("<!-- walkthrough")[1].split("<!-- /walkthrough -->")[0]
    return "\n".join(re.findall(r"```bash\n(.*?)```", section, re.S))


def test_curl_walkthrough_runs(server, tmp_path):
    script = "set -euo pipefail\n" + walkthrough()
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60, env={"URL": server.url, "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert '"step":1' in out and '"step":2' in out
    assert "gradient 'w': expected shape [2, 2], got [1, 2]" in out
    assert not (tmp_path / "checkpoint.json").exists()


def test_python_snippets_run(server):
    snippets = blocks("python")
    assert len(snippets) == 2
    outputs = []
    for snippet in snippets:
        result = subprocess.run([sys.executable, "-c", snippet.replace(DEFAULT_URL, server.url)],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout.split())
    session_id, steps, dtype = outputs[0]
    assert steps == "100" and dtype == "float64" and len(session_id) >= 22
    assert outputs[1] == ["20"]


def test_javascript_snippet_runs(server, tmp_path):
    (snippet,) = blocks("js")
    program = snippet.replace(DEFAULT_URL, server.url).replace('"optim-client"', f'"{JS_CLIENT.as_uri()}"')
    (tmp_path / "snippet.mjs").write_text(program)
    result = subprocess.run([shutil.which("node") or "node", str(tmp_path / "snippet.mjs")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    steps, w0, b0 = result.stdout.split()
    assert steps == "1" and abs(float(w0) + 0.001) < 1e-7 and abs(float(b0) - 0.001) < 1e-7
