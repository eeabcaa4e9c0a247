"""Locust against a chat server: chatsse's users (chatsse/locust.py), one per protocol.

Name the user class to run one protocol only (with none, Locust runs all three)::

    locust -f scripts/locustfile.py ChatsseUser --host http://127.0.0.1:8000 \\
        --headless -u 50 -r 10 --run-time 1m --chat-turns 3 --chat-think-time 1
    locust -f scripts/locustfile.py OpenAIChatUser --host http://gpu-box:8000/v1 --chat-max-tokens 256

Distributed: ``--master`` here, and on each load machine
``locust -f scripts/locustfile.py --worker --master-host <master>`` (or ``-f -`` to take the
locustfile from the master). The ``--chat-*`` options: chatsse/locust.py and the README
("Many load machines: Locust").
"""

from __future__ import annotations

from chatsse.locust import ChatsseUser, OpenAIChatUser, OpenAIResponsesUser

__all__ = ["ChatsseUser", "OpenAIChatUser", "OpenAIResponsesUser"]
