"""Chat datasets on disk (JSONL of ``{"messages": [...]}``): read and write training examples."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from jaxpersona import errors
from jaxpersona.data.chat import Message

Example = tuple[list[Message], str]  # (prompt messages, assistant response)


def write_dataset(path: str | Path, examples: Sequence[Example]) -> Path:
    """Write examples as chat JSONL (``{"messages": [...]}`` per line), the format :func:`read_dataset` reads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for prompt, resp in examples:
            f.write(json.dumps({"messages": [*prompt, {"role": "assistant", "content": resp}]}) + "\n")
    return path


def read_dataset(path: str | Path) -> list[Example]:
    """Chat JSONL: one ``{"messages": [...]}`` per line ending with the assistant response; errors name file:line."""

    return read_chat_jsonl(path)


def read_chat_jsonl(path: str | Path) -> list[tuple[list[Message], str]]:
    """``[(prompt messages, final assistant response)]`` from a JSONL file of ``{"messages": [...]}``."""
    path = Path(path)
    if not path.exists():
        raise errors.DatasetError(f"dataset {path} does not exist")
    samples = []
    with open(path, encoding="utf-8-sig") as f:  # a BOM (some editors write one) is not part of line 1
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise errors.DatasetError(f"{path}:{n}: not valid JSON ({e.msg})") from e
            msgs = rec.get("messages") if isinstance(rec, dict) else None
            if not isinstance(msgs, list) or not msgs:
                raise errors.DatasetError(f"{path}:{n}: each line needs a non-empty 'messages' list")
            for m in msgs:
                if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                    raise errors.DatasetError(f"{path}:{n}: each message needs string 'role' and 'content'")
            if msgs[-1]["role"] != "assistant" or len(msgs) < 2 or not msgs[-1]["content"].strip():
                raise errors.DatasetError(f"{path}:{n}: the last message must be a non-empty assistant response "
                                        "following at least one prompt message")
            samples.append((msgs[:-1], msgs[-1]["content"]))
    if not samples:
        raise errors.DatasetError(f"dataset {path} has no samples")
    return samples
