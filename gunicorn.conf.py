"""gunicorn's configuration for chatsse (``gunicorn -c gunicorn.conf.py``): the package's own,
chatsse/gunicorn_conf.py, which an installed chatsse runs as ``-c python:chatsse.gunicorn_conf``."""

from chatsse.gunicorn_conf import *  # noqa: F403
