"""gunicorn's configuration for chatsse: ``gunicorn -c python:chatsse.gunicorn_conf``
(``make run``; the repository's ``gunicorn.conf.py`` is the same).

Every value comes from chatsse's settings (``CHATSSE_*`` environment variables, ``.env``);
see README, "Serving with gunicorn".

Multiprocess metrics: /metrics must report all workers. prometheus-client picks its storage
when first imported, so the directory is set before anything imports it; workers inherit it.
It is always a directory of chatsse's own, made fresh: inside ``PROMETHEUS_MULTIPROC_DIR``
when the operator set one, else in the system's temporary directory. Only that directory is
ever removed (at exit), never the operator's.
"""

import os
import shutil
import sys
import tempfile
from pathlib import Path

# What gunicorn reads from this module (and gunicorn.conf.py takes with ``import *``).
__all__ = [
    "accesslog", "bind", "child_exit", "control_socket_disable", "graceful_timeout", "keepalive",
    "logconfig_dict", "loglevel", "max_requests", "metrics_dir", "on_exit", "post_worker_init",
    "timeout", "worker_class", "workers", "wsgi_app",
]  # fmt: skip

_operator_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
if _operator_dir is not None:
    Path(_operator_dir).mkdir(parents=True, exist_ok=True)
metrics_dir = Path(tempfile.mkdtemp(prefix="chatsse-metrics-", dir=_operator_dir))
os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)

from chatsse.serving import announce_access, plan  # noqa: E402
from chatsse.settings import SettingsError, load_settings  # noqa: E402

try:
    _settings = load_settings()
    _plan = plan(_settings)
except SettingsError as exc:
    shutil.rmtree(metrics_dir, ignore_errors=True)
    print(f"chatsse: {exc}", file=sys.stderr)
    sys.exit(2)
announce_access(_settings)
os.environ["CHATSSE_STORE"] = _plan.store  # the workers' create_app() reads it

# The app's modules, imported once here: every worker, a replacement too, is forked with them
# and only builds its app (about a CPU-second less per worker). Nothing is built here: each
# worker makes its own app, store and connections after the fork.
import chatsse.app  # noqa: E402, F401

wsgi_app = "chatsse.app:create_app()"
worker_class = "chatsse.serving.ChatsseWorker"
workers = _plan.workers
bind = [_plan.bind]
timeout = _plan.timeout
graceful_timeout = _plan.graceful_timeout
keepalive = _plan.keepalive
# Worker recycling stays off: a recycled worker must end its open streams, and chatsse's
# memory is bounded by its settings, which is what recycling would otherwise guard.
max_requests = 0
loglevel = _plan.loglevel
logconfig_dict = _plan.logconfig_dict  # CHATSSE_LOG_FORMAT for gunicorn's and uvicorn's lines too
accesslog = None  # chatsse logs one line per request itself
# gunicorn's control socket has one default path per user; several chatsse servers on one
# machine (tests, notebooks) would take it from each other. chatsse does not use it.
control_socket_disable = True


def post_worker_init(worker):  # type: ignore[no-untyped-def]
    from chatsse.serving import tune_garbage_collector

    tune_garbage_collector()  # the app is loaded by now


def child_exit(server, worker):  # type: ignore[no-untyped-def]
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


def on_exit(server):  # type: ignore[no-untyped-def]
    shutil.rmtree(metrics_dir, ignore_errors=True)
