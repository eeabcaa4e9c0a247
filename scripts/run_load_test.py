"""Load-test a streaming chat server: the same flags as ``chatsse load`` (see ``--help``).

Usage: ``python scripts/run_load_test.py http://127.0.0.1:8000 --requests 200 --concurrency 20``
"""

from __future__ import annotations

import sys

from chatsse.loadcli import main

if __name__ == "__main__":
    sys.exit(main(prog="run_load_test.py"))
