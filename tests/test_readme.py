"""The README's curl walk-through runs, as written, against a live server."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def walkthrough() -> str:
    text = README.read_text()
    section = text.split("<!-- walkthrough")[1].split("<!-- /walkthrough -->")[0]
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


def test_sdk_snippet_runs(server):
    text = README.read_text().split("## The Python SDK")[1]
    snippet = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    result = subprocess.run([sys.executable, "-c", snippet.replace("http://127.0.0.1:8000", server.url)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    session_id, steps, dtype = result.stdout.split()
    assert steps == "100" and dtype == "float64" and len(session_id) >= 22
