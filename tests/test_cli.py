"""The console script refuses configurations that cannot work, saying why."""

import subprocess

from conftest import SERVICE_BIN


def test_memory_store_refuses_several_workers():
    result = subprocess.run([str(SERVICE_BIN), "serve", "--workers", "2", "--store", "memory"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "memory store" in result.stderr and "sqlite" in result.stderr


def test_help_lists_serve():
    result = subprocess.run([str(SERVICE_BIN), "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "serve" in result.stdout
