"""Reference servers for ``scripts/bench_server.py``: the same reply as chatsse's ``POST /chat``
(``connected``, one ``message`` event per token, ``completed``), served by uvicorn.

- :mod:`benchmarks.bare_asgi`: a raw ASGI app sending pre-encoded event bytes, the practical
  floor for a Python SSE server.
- :mod:`benchmarks.sse_starlette_app`: plain sse-starlette usage, ``EventSourceResponse``
  over an async generator of ``ServerSentEvent`` objects, in a Starlette app.

Both read the reply shape from :mod:`benchmarks.reply` (environment variables), and honour
the request's ``max_tokens`` like chatsse does.
"""
