"""The package as users install it: a wheel in a fresh virtual environment with the server's
dependencies only (no ``[load]``, no ``[workbook]``), run from a directory that is not this
checkout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from support import chat, require_binary, wait_for

from chatsse.processes import free_port

ROOT = Path(__file__).resolve().parent.parent


def _uv() -> str:
    """The uv that ``make`` installs (``.tools/bin/uv``), or one on PATH."""
    found = ROOT / ".tools" / "bin" / "uv"
    return str(found) if found.exists() else require_binary("uv", "make installs it in .tools/")


@dataclass(frozen=True)
class Installed:
    bin: Path
    workdir: Path

    def env(self, **extra: str) -> dict[str, str]:
        keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
        return {**keep, "PATH": f"{self.bin}{os.pathsep}{keep.get('PATH', '')}", **extra}


def _run(*args: str | Path, cwd: Path = ROOT) -> None:
    subprocess.run([str(a) for a in args], cwd=cwd, check=True, capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    uv = _uv()
    base = tmp_path_factory.mktemp("wheel")
    _run(uv, "build", "--wheel", "--out-dir", base / "dist")
    (wheel,) = (base / "dist").glob("chatsse-*.whl")
    requirements = base / "requirements.txt"
    _run(uv, "export", "--frozen", "--no-dev", "--no-emit-project", "--no-hashes", "-o", requirements)
    _run(uv, "venv", base / "venv", "--python", sys.executable)
    python = base / "venv" / "bin" / "python"
    _run(uv, "pip", "install", "--python", python, "-r", requirements, wheel)
    workdir = base / "elsewhere"
    workdir.mkdir()
    return Installed(base / "venv" / "bin", workdir)


def test_the_wheel_carries_the_page_and_the_type_marker(installed: Installed) -> None:
    listing = "import chatsse, pathlib; print(*pathlib.Path(chatsse.__file__).parent.rglob('*'))"
    files = subprocess.run(
        [installed.bin / "python", "-c", listing],
        capture_output=True, text=True, check=True, cwd=installed.workdir, env=installed.env(),
    ).stdout.split()  # fmt: skip
    names = {Path(f).name for f in files}
    assert {"index.html", "py.typed", "gunicorn_conf.py"} <= names
    assert not any(f.startswith(str(ROOT)) for f in files)  # the installed copy, not this checkout


def test_the_load_client_comes_with_the_server_and_its_plots_are_an_extra(installed: Installed) -> None:
    for module, present in (("aiohttp", True), ("plotly", False), ("pandas", False)):
        found = subprocess.run(
            [installed.bin / "python", "-c", f"import {module}"], capture_output=True, cwd=installed.workdir
        )
        assert (found.returncode == 0) == present, module
    load = subprocess.run(
        [installed.bin / "chatsse", "load", "--plot", "p.html", "http://127.0.0.1:1"],
        capture_output=True, text=True, cwd=installed.workdir, env=installed.env(), timeout=60,
    )  # fmt: skip
    assert load.returncode == 2
    assert "pip install 'chatsse[load]'" in load.stderr


def _serve(installed: Installed, command: list[str | Path], port: int, **env: str) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [str(c) for c in command],
        cwd=installed.workdir,
        env=installed.env(CHATSSE_PORT=str(port), CHATSSE_LOG_LEVEL="warning", CHATSSE_SIM_TTFT_MS="1",
                          CHATSSE_SIM_TOKEN_INTERVAL_MS="1", **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    return process


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def _stop(process: subprocess.Popen[str], sig: int) -> str:
    process.send_signal(sig)
    try:
        out, _ = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
    return out


def test_chatsse_serve_runs_from_the_installed_wheel(installed: Installed) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = _serve(installed, [installed.bin / "chatsse", "serve"], port)
    try:
        assert wait_for(lambda: _healthy(url), 30, 0.1), process.stdout.read() if process.stdout else ""
        with httpx.Client(base_url=url) as client:
            assert chat(client, "installed?").events[-1].event == "completed"
            assert 'id="messages"' in client.get("/").text  # the page is in the wheel
    finally:
        out = _stop(process, signal.SIGINT)
    assert process.returncode == 0, out


def test_gunicorn_runs_the_installed_configuration(installed: Installed) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command: list[str | Path] = [installed.bin / "gunicorn", "-c", "python:chatsse.gunicorn_conf"]
    process = _serve(installed, command, port, CHATSSE_WORKERS="2")
    try:
        assert wait_for(lambda: _healthy(url), 30, 0.1)
        with httpx.Client(base_url=url) as client:
            result = chat(client, "under gunicorn")
            assert result.events[-1].event == "completed"
            stored = client.get(f"/conversations/{result.conversation_id}").json()
            assert stored["message_count"] == 2
    finally:
        out = _stop(process, signal.SIGTERM)
    assert process.returncode == 0, out
    assert (installed.workdir / ".chatsse" / "conversations.db").exists()  # the default shared store
