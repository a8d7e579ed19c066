"""Chat messages: the one message type, a one-turn conversation, and what answers conversations."""

from __future__ import annotations

from typing import Protocol

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": text}


def conversation(user: str, system: str | None = None) -> list[Message]:
    """``[system?, user]`` messages of a one-turn chat."""
    msgs = [{"role": "system", "content": system}] if system else []
    return [*msgs, {"role": "user", "content": user}]


class Completer(Protocol):
    """Anything that turns conversations into reply texts (an HTTP endpoint or a local model)."""

    def complete(
        self, conversations: list[list[Message]], *, max_tokens: int, temperature: float, seed: int | None
    ) -> list[str]: ...
