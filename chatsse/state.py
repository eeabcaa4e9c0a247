"""The objects one chatsse app is made of, built once by ``create_app`` and shared by its routes."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from chatsse.conversations import ConversationManager
from chatsse.deadlines import Deadlines
from chatsse.engine import Engine
from chatsse.lifecycle import Lifecycle
from chatsse.limits import TurnLimits
from chatsse.metrics import Metrics
from chatsse.replay import ReplayLog
from chatsse.replay.recorder import ReplayRecorder
from chatsse.replay.signals import ReplySignals
from chatsse.settings import Settings

__all__ = ["AppState"]


@dataclass
class AppState:
    settings: Settings
    deadlines: Deadlines
    engine: Engine
    manager: ConversationManager
    metrics: Metrics
    lifecycle: Lifecycle
    replay: ReplayLog
    recorder: ReplayRecorder
    signals: ReplySignals
    limits: TurnLimits
    started_at: float = field(default_factory=time.time)
