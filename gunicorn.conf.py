"""gunicorn configuration for chatsse: ``gunicorn -c gunicorn.conf.py`` (``make run``).

Every value comes from chatsse's settings (``CHATSSE_*`` environment variables, ``.env``);
see README, "Serving with gunicorn".
"""

import os
import shutil
import sys
import tempfile
from pathlib import Path

# Multiprocess metrics: /metrics must report all workers. prometheus-client picks its
# storage when first imported, so the directory is set before anything imports it; workers
# inherit it. Cleaned at start (stale files would add old counts) and removed at exit.
metrics_dir = Path(
    os.environ.setdefault(
        "PROMETHEUS_MULTIPROC_DIR", str(Path(tempfile.gettempdir()) / f"chatsse-metrics-{os.getpid()}")
    )
)
shutil.rmtree(metrics_dir, ignore_errors=True)
metrics_dir.mkdir(parents=True)

from chatsse.serving import StoreError, plan  # noqa: E402
from chatsse.settings import SettingsError, load_settings  # noqa: E402

try:
    _plan = plan(load_settings(), os.environ)
except (SettingsError, StoreError) as exc:
    print(f"chatsse: {exc}", file=sys.stderr)
    sys.exit(2)
os.environ["CHATSSE_STORE"] = _plan.store  # the workers' create_app() reads it
if _plan.store.startswith("sqlite:///"):
    Path(_plan.store.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)

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

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):  # type: ignore[no-untyped-def]
    shutil.rmtree(metrics_dir, ignore_errors=True)
