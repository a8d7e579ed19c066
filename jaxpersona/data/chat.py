"""Chat messages: the one message type and a one-turn conversation."""

from __future__ import annotations

Message = dict[str, str]


def conversation(user: str, system: str | None = None) -> list[Message]:
    msgs = [{"role": "system", "content": system}] if system else []
    return [*msgs, {"role": "user", "content": user}]
