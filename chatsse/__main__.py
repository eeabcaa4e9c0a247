"""``python -m chatsse``: the ``chatsse`` command."""

from chatsse.cli import main

__all__: list[str] = []

raise SystemExit(main())
