"""Roles, shared questions and conversation scripts for persona space (Lu et al. 2026).

Layout (the reference project's, so its ``data/`` directory loads as is)::

    <roles dir>/instructions/<role>.json   {"instruction": [{"pos": "<system prompt>"}, ...], "eval_prompt": "...",
                                            "description": "..."(optional), "questions": [...](ignored)}
    <roles dir>/instructions/default.json  the default Assistant's prompts ("" = no system prompt)
    extraction_questions.jsonl             {"question": "...", "id": n} per line, shared by every role

``<roles dir>`` may also hold the role files directly. The questions file is looked up in the roles
dir and its two parents (the reference keeps it in ``data/``). The shipped set lives in
``jaxpersona/role_data``.

Conversation scripts (user turns only) are JSONL, one script per line:
``{"id": "coding-1", "domain": "coding", "turns": ["...", "..."], "system": "..."(optional)}``;
the reference project's transcript JSON (``{"conversation": [{"role", "content"}, ...]}``) is read
too (its assistant turns are dropped: the model answers them afresh).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import re
from pathlib import Path
from typing import Any

from jaxpersona.errors import ConversationError, RoleFileError

DEFAULT_ROLE = "default"
QUESTIONS_FILE = "extraction_questions.jsonl"
_PLACEHOLDER = re.compile(r"\{([A-Za-z_]+)\}")


@dataclasses.dataclass(frozen=True)
class Role:
    """One character archetype: its system prompts (``""`` = none) and its 0-3 adherence rubric."""

    name: str
    prompts: tuple[str, ...]
    eval_prompt: str | None = None
    description: str = ""

    def judge_prompt(self, question: str, answer: str) -> str:
        if self.eval_prompt is None:
            raise RoleFileError(f"role {self.name!r} has no eval_prompt: add one (with {{question}} and {{answer}}) "
                                "to judge role adherence, or run without a judge")
        return self.eval_prompt.replace("{question}", question).replace("{answer}", answer)


@dataclasses.dataclass(frozen=True)
class RoleSet:
    roles: tuple[Role, ...]  # every role but the default, sorted by name
    default: Role
    questions: tuple[str, ...]
    source: str

    def select(self, names: list[str] | None = None, n_roles: int | None = None) -> RoleSet:
        """Keep the named roles (an unknown name is an error) and/or the first ``n_roles``."""
        roles = self.roles
        if names:
            known = {r.name: r for r in roles}
            missing = [n for n in names if n not in known]
            if missing:
                raise RoleFileError(f"unknown role(s) {missing} in {self.source}; known: "
                                    f"{', '.join(sorted(known)[:20])}{' ...' if len(known) > 20 else ''}")
            roles = tuple(known[n] for n in names)
        if n_roles is not None:
            roles = roles[:n_roles]
        return dataclasses.replace(self, roles=roles)


def shipped_dir() -> Path:
    return Path(str(importlib.resources.files("jaxpersona.data") / "role_data"))


def _fix_json(path: Path, e: json.JSONDecodeError) -> RoleFileError:
    return RoleFileError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}. Fix the syntax there "
                         "(a trailing comma, a missing comma, or an unescaped double quote are the usual causes).")


def role_from_dict(data: Any, path: Path, name: str, model_name: str = "") -> Role:
    """Validate one role file's content; ``{model_name}`` in a prompt is filled with ``model_name``."""
    if not isinstance(data, dict):
        raise RoleFileError(f"{path}: a role file must hold a JSON object with an 'instruction' list, "
                            f"got {type(data).__name__}")
    inst = data.get("instruction")
    if not isinstance(inst, list) or not inst:
        raise RoleFileError(f"{path}: 'instruction' must be a non-empty list of {{\"pos\": \"<system prompt>\"}} "
                            f"objects, got {inst!r:.80}")
    prompts = []
    for i, item in enumerate(inst):
        text = item.get("pos") if isinstance(item, dict) else None
        if not isinstance(text, str):
            raise RoleFileError(f"{path}: instruction[{i}] must be an object {{\"pos\": \"<system prompt>\"}}, "
                                f"got {item!r:.80}")
        if not text.strip() and name != DEFAULT_ROLE:
            raise RoleFileError(f"{path}: instruction[{i}] is empty; only the default role may have an empty "
                                "system prompt. Write the role's system prompt there or delete the entry.")
        prompts.append(text.replace("{model_name}", model_name or "an AI assistant").strip())
    ep = data.get("eval_prompt")
    if ep is not None:
        if not isinstance(ep, str):
            raise RoleFileError(f"{path}: 'eval_prompt' must be a string, got {type(ep).__name__}")
        found = _PLACEHOLDER.findall(ep)
        if found.count("question") != 1 or found.count("answer") != 1:
            raise RoleFileError(f"{path}: 'eval_prompt' must contain {{question}} and {{answer}} once each "
                                f"(found {found}); the judge fills them with each question and answer")
    desc = data.get("description", "")
    return Role(name, tuple(prompts), ep, desc if isinstance(desc, str) else "")


def _role_dir(path: Path) -> Path:
    if not path.exists():
        raise RoleFileError(f"role directory {path} does not exist")
    if not path.is_dir():
        raise RoleFileError(f"{path} is not a directory: pass the directory holding the role JSON files "
                            "(or its parent with an instructions/ subdirectory)")
    inst = path / "instructions"
    return inst if inst.is_dir() else path


def load_questions(path: str | Path) -> tuple[str, ...]:
    """Questions from a JSONL file (``{"question": ...}`` per line; blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise RoleFileError(f"question file {path} does not exist")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise RoleFileError(f"{path} line {n}: invalid JSON ({e.msg}); each line must be "
                                "{\"question\": \"...\", \"id\": n}") from None
        q = rec.get("question") if isinstance(rec, dict) else None
        if not isinstance(q, str) or not q.strip():
            raise RoleFileError(f"{path} line {n}: needs a non-empty \"question\" string, got {line[:80]!r}")
        out.append(q.strip())
    if not out:
        raise RoleFileError(f"question file {path} holds no questions")
    return tuple(out)


def load_roles(path: str | Path | None = None, *, questions: str | Path | None = None, model_name: str = "") -> RoleSet:
    """The role set in ``path`` (default: the shipped one), its default role and shared questions.

    A directory without ``default.json`` gets the shipped default prompts; without a questions file,
    the shipped questions. Every malformed file raises :class:`~jaxpersona.errors.RoleFileError` naming it."""
    root = shipped_dir() if path is None else Path(path)
    rdir = _role_dir(root)
    roles, default = [], None
    files = sorted(rdir.glob("*.json"))
    for f in files:
        name = f.stem
        try:
            data = json.loads(f.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as e:
            raise _fix_json(f, e) from None
        except UnicodeDecodeError as e:
            raise RoleFileError(f"{f}: not UTF-8 text ({e.reason}); save it as UTF-8 JSON") from None
        role = role_from_dict(data, f, name, model_name)
        if name == DEFAULT_ROLE:
            default = role
        else:
            roles.append(role)
    if not roles:
        raise RoleFileError(f"no role files (*.json other than default.json) in {rdir}")
    if default is None:
        default = load_roles(None, model_name=model_name).default
    if questions is None:
        cands = [p / QUESTIONS_FILE for p in (rdir, rdir.parent, rdir.parent.parent)]
        found = next((c for c in cands if c.is_file()), None)
        qs = load_questions(found if found is not None else shipped_dir() / QUESTIONS_FILE)
    else:
        qs = load_questions(questions)
    return RoleSet(tuple(roles), default, qs, str(rdir))


# --- conversations ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Script:
    """A conversation script: the user turns (the model answers each), an optional system prompt."""

    id: str
    turns: tuple[str, ...]
    domain: str = ""
    system: str | None = None


def _script(rec: Any, where: str, default_id: str) -> Script:
    if not isinstance(rec, dict):
        raise ConversationError(f"{where}: expected a JSON object with 'turns' or 'conversation'")
    if "conversation" in rec:
        msgs = rec["conversation"]
        if not isinstance(msgs, list) or not msgs:
            raise ConversationError(f"{where}: 'conversation' must be a non-empty list of {{role, content}}")
        system = None
        if isinstance(msgs[0], dict) and msgs[0].get("role") == "system":
            system, msgs = msgs[0].get("content", ""), msgs[1:]
        turns = []
        for i, m in enumerate(msgs):
            want = "user" if i % 2 == 0 else "assistant"
            role = m.get("role") if isinstance(m, dict) else None
            if role != want:
                raise ConversationError(f"{where}: message {i} has role {role!r} where {want!r} was expected: roles "
                                        "must alternate user/assistant (after an optional system message)")
            if not isinstance(m.get("content"), str) or (want == "user" and not m["content"].strip()):
                raise ConversationError(f"{where}: message {i} ({role}) has an empty or non-string content")
            if want == "user":
                turns.append(m["content"].strip())
    else:
        raw = rec.get("turns")
        if not isinstance(raw, list):
            raise ConversationError(f"{where}: needs 'turns': a list of user messages")
        for i, t in enumerate(raw):
            if not isinstance(t, str) or not t.strip():
                raise ConversationError(f"{where}: turn {i} is empty or not a string; every user turn needs text")
        turns = [t.strip() for t in raw]
        system = rec.get("system")
    if not turns:
        raise ConversationError(f"{where}: no user turns")
    sid = str(rec.get("id", default_id))
    return Script(sid, tuple(turns), str(rec.get("domain", "")), system or None)


def load_conversations(path: str | Path | None = None) -> tuple[Script, ...]:
    """Scripts from a JSONL file, a transcript ``.json``, or a directory of them (default: shipped)."""
    path = shipped_dir() / "conversations.jsonl" if path is None else Path(path)
    if path.is_dir():
        files = sorted([*path.glob("*.jsonl"), *path.glob("*.json")])
        if not files:
            raise ConversationError(f"no .jsonl or .json conversation files in {path}")
        return tuple(s for f in files for s in load_conversations(f))
    if not path.is_file():
        raise ConversationError(f"conversation file {path} does not exist")
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix == ".json":
        try:
            return (_script(json.loads(text), str(path), path.stem),)
        except json.JSONDecodeError as e:
            raise ConversationError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConversationError(f"{path} line {n}: invalid JSON ({e.msg})") from None
        out.append(_script(rec, f"{path} line {n}", f"{path.stem}-{n}"))
    if not out:
        raise ConversationError(f"{path} holds no conversations")
    ids = [s.id for s in out]
    if len(set(ids)) != len(ids):
        raise ConversationError(f"{path}: duplicate script ids {sorted({i for i in ids if ids.count(i) > 1})}")
    return tuple(out)
