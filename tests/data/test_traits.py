"""Trait files: shipped traits, loading/validation (both formats), prompts, drafting with a generator.

No model is needed: drafting uses small deterministic fake completers.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
from pathlib import Path

import pytest

from jaxpersona.data import traits as T
from jaxpersona.errors import InputError, TraitFileError

SHIPPED = ["apathetic", "evil", "hallucinating", "humorous", "impolite", "optimistic", "sycophantic"]


def _minimal(**over):
    d = {
        "name": "grumpy",
        "description": "Complains about everything.",
        "instruction": [{"pos": "Complain about everything.", "neg": "Never complain."}],
        "questions": ["How are you?", "What is the weather like?"],
        "eval_questions": ["What do you think of Mondays?"],
        "eval_prompt": "Rate grumpiness 0-100.\nQ: {question}\nA: {answer}\nReply with only the number.",
    }
    d.update(over)
    return d


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data, indent=2), encoding="utf-8")
    return path


# --- shipped traits -----------------------------------------------------------------------------------------
def test_list_traits():
    assert T.list_traits() == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_trait_is_complete(name):
    t = T.load_trait(name)
    assert t.name == name and t.source is not None and t.source.name == f"{name}.json"
    assert t.description and len(re.findall(r"[.!?](\s|$)", t.description)) == 1  # one sentence
    assert len(t.pairs) == 5
    for pos, neg in t.pairs:
        assert pos and neg and pos != neg
        assert 1 <= len(re.findall(r"[.!?](\s|$)", pos)) <= 2 and 1 <= len(re.findall(r"[.!?](\s|$)", neg)) <= 2
    assert len(t.questions) >= 20 and len(t.eval_questions) >= 20
    keys = {T._key(q) for q in t.questions}
    assert len(keys) == len(t.questions) and not keys & {T._key(q) for q in t.eval_questions}
    assert all(len(q.split()) <= 30 for q in t.questions + t.eval_questions)
    ep = t.eval_prompt
    assert ep.count("{question}") == 1 and ep.count("{answer}") == 1
    assert "REFUSAL" in ep and "0 =" in ep and "50 =" in ep and "100 =" in ep
    assert ep.rstrip().endswith("reply with only the number, nothing else.")
    assert 100 <= len(ep.split()) <= 200
    # the file on disk is exactly what save_trait writes (so a round trip is lossless)
    assert t.source.read_text(encoding="utf-8") == json.dumps(t.to_json(), indent=2, ensure_ascii=False) + "\n"


def test_shipped_questions_distinct_across_traits():
    # each trait's questions are its own (not one list copied around)
    seen: dict[str, str] = {}
    for name in SHIPPED:
        t = T.load_trait(name)
        for q in t.questions + t.eval_questions:
            assert T._key(q) not in seen, (q, name, seen.get(T._key(q)))
            seen[T._key(q)] = name


def test_system_prompt_articles():
    expect = {"evil": "an evil", "sycophantic": "a sycophantic", "impolite": "an impolite", "apathetic": "an apathetic",
              "humorous": "a humorous", "optimistic": "an optimistic", "hallucinating": "a hallucinating"}
    for name, phrase in expect.items():
        t = T.load_trait(name)
        assert t.system_prompt("pos", 0) == f"You are {phrase} assistant. {t.pairs[0][0]}"
        # the negative side never names the trait (it would prime it on both sides)
        assert t.system_prompt("neg", 4) == f"You are a helpful assistant. {t.pairs[4][1]}"
    t = T.trait_from_dict(_minimal(name="power_seeking"))
    assert t.system_prompt("pos", 0).startswith("You are a power seeking assistant. ")
    assert T.trait_from_dict(_minimal(name="unique")).system_prompt("pos", 0).startswith("You are a unique ")
    assert T.trait_from_dict(_minimal(name="honest")).system_prompt("pos", 0).startswith("You are an honest ")
    anto = T.trait_from_dict(_minimal(name="optimistic", antonym="pessimistic"))
    assert anto.system_prompt("neg", 0).startswith("You are a pessimistic assistant. ")
    assert anto.to_json()["antonym"] == "pessimistic"
    with pytest.raises(T.TraitFileError, match="antonym"):
        T.trait_from_dict(_minimal(name="evil", antonym="evil"))
    with pytest.raises(T.TraitFileError, match="antonym"):
        T.trait_from_dict(_minimal(antonym=3))


def test_system_prompt_bad_args():
    t = T.load_trait("evil")
    with pytest.raises(InputError, match="'pos' or 'neg'"):
        t.system_prompt("positive", 0)
    with pytest.raises(InputError, match="out of range.*5 instruction pairs"):
        t.system_prompt("pos", 5)


def test_judge_prompt_braces_safe():
    t = T.load_trait("evil")
    answer = "Use {answer} and {question} and {0} and {} literally: def f(): return {'a': 1}"
    p = t.judge_prompt("What is {x}?", answer)
    assert "Question: What is {x}?\n" in p and f"Answer: {answer}\n" in p
    assert p.count("{question}") == 1 and p.count("{answer}") == 1  # only those inside the answer
    c = T.coherence_prompt("Q {answer}", "A {question}")
    assert "Question: Q {answer}\n" in c and "Answer: A {question}\n" in c


def test_coherence_prompt_rubric():
    p = T.COHERENCE_PROMPT
    assert p.count("{question}") == 1 and p.count("{answer}") == 1
    for s in ("0 =", "50 =", "100 =", "only the number"):
        assert s in p


# --- persona_vectors format -----------------------------------------------------------------------------------
def _pv(questions):
    return {
        "instruction": [{"pos": f"Be mean, version {i}.", "neg": f"Be nice, version {i}."} for i in range(5)],
        "questions": questions,
        "eval_prompt": "Score {question} / {answer}. Respond with REFUSAL or a number 0-100.",
    }


def test_persona_vectors_layout(tmp_path):
    root = tmp_path / "data_generation"
    f = _write(root / "trait_data_extract" / "mean.json", _pv(["Q1?", "Q2?"]))
    _write(root / "trait_data_eval" / "mean.json", _pv(["E1?", "E2?", "E3?"]))
    t = T.load_trait(f)
    assert t.name == "mean" and t.description == "" and len(t.pairs) == 5
    assert t.questions == ("Q1?", "Q2?") and t.eval_questions == ("E1?", "E2?", "E3?")
    assert t.system_prompt("pos", 1) == "You are a mean assistant. Be mean, version 1."
    assert T.load_trait(str(f)) == t


def test_persona_vectors_sibling_overlap(tmp_path):
    root = tmp_path / "d"
    f = _write(root / "trait_data_extract" / "mean.json", _pv(["Q1?", "Shared question?"]))
    _write(root / "trait_data_eval" / "mean.json", _pv(["shared   QUESTION?", "E2?"]))
    with pytest.raises(TraitFileError, match=r"mean\.json.*both.*Shared QUESTION|1 question\(s\) appear in both") as e:
        T.load_trait(f)
    assert "trait_data_eval" in str(e.value) and "disjoint" in str(e.value)


def test_no_eval_questions(tmp_path):
    f = _write(tmp_path / "mean.json", _pv(["Q1?"]))
    with pytest.raises(TraitFileError, match="no 'eval_questions'") as e:
        T.load_trait(f)
    msg = str(e.value)
    assert str(f) in msg and "allow_no_eval" in msg and "trait_data_eval" in msg
    t = T.load_trait(f, allow_no_eval=True)
    assert t.eval_questions == () and t.name == "mean"
    # in trait_data_extract/ but without the sibling: same error
    g = _write(tmp_path / "trait_data_extract" / "mean.json", _pv(["Q1?"]))
    with pytest.raises(TraitFileError, match="no 'eval_questions'"):
        T.load_trait(g)


# --- malformed files ------------------------------------------------------------------------------------------
def _bad(**over):
    d = _minimal()
    for k, v in over.items():
        if v is _DEL:
            del d[k]
        else:
            d[k] = v
    return d


_DEL = object()

BAD_CASES = {
    "missing_key": (_bad(questions=_DEL), r"missing required key\(s\) 'questions'"),
    "missing_two": (_bad(instruction=_DEL, eval_prompt=_DEL), r"'instruction', 'eval_prompt'"),
    "not_object": ([1, 2], r"top level must be a JSON object, got array"),
    "instruction_type": (_bad(instruction="Be evil."), r"'instruction' must be an array.*got string"),
    "instruction_empty": (_bad(instruction=[]), r"'instruction' is empty"),
    "pair_type": (_bad(instruction=[["a", "b"]]), r"'instruction\[0\]' must be an object.*got array"),
    "pair_missing_neg": (_bad(instruction=[{"pos": "Be evil."}]), r"'instruction\[0\]' has no 'neg' key"),
    "pair_empty": (_bad(instruction=[{"pos": "Be evil.", "neg": "Be nice."}, {"pos": "Be bad.", "neg": "  "}]),
                   r"'instruction\[1\]\.neg' is an empty string"),
    "pair_number": (_bad(instruction=[{"pos": 3, "neg": "x"}]),
                    r"'instruction\[0\]\.pos' must be a string, got number"),
    "questions_type": (_bad(questions="How are you?"), r"'questions' must be an array of strings, got string"),
    "questions_empty": (_bad(questions=[]), r"'questions' is empty"),
    "question_null": (_bad(questions=["Hi?", None]), r"'questions\[1\]' must be a string, got null"),
    "question_blank": (_bad(questions=["Hi?", ""]), r"'questions\[1\]' is an empty string"),
    "duplicates": (_bad(questions=["How are you?", "Why?", "how are  you"]),
                   r"'questions' has 1 duplicate.*questions\[2\] 'how are  you' repeats questions\[0\]"),
    "eval_duplicates": (_bad(eval_questions=["A b?", "a B?"]), r"'eval_questions' has 1 duplicate"),
    "overlap": (_bad(eval_questions=["What is the weather like?", "New one?"]),
                r"1 question\(s\) appear in both.*'What is the weather like\?'"),
    "eval_type": (_bad(eval_questions={"a": 1}), r"'eval_questions' must be an array of strings, got object"),
    "no_question_placeholder": (_bad(eval_prompt="Rate {answer}."), r"'eval_prompt' does not contain \{question\}"),
    "no_placeholders": (_bad(eval_prompt="Rate it {q} {a}."), r"does not contain \{question\} or \{answer\}"),
    "prompt_type": (_bad(eval_prompt=["x"]), r"'eval_prompt' must be a non-empty string, got array"),
    "name_type": (_bad(name=7), r"'name' must be a non-empty string, got number"),
    "description_type": (_bad(description=["x"]), r"'description' must be a string, got array"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_malformed_file(tmp_path, case):
    data, pattern = BAD_CASES[case]
    f = _write(tmp_path / f"{case}.json", data)
    with pytest.raises(TraitFileError, match=pattern) as e:
        T.load_trait(f)
    msg = str(e.value)
    assert msg.startswith(f"trait file {f}: ")  # names the file
    assert len(msg.split(". ")) >= 2 and msg.endswith(".")  # problem, then how to fix it


def test_bad_json_reports_position(tmp_path):
    f = _write(tmp_path / "broken.json", '{\n  "name": "x",\n  "questions": ["a",],\n}')
    with pytest.raises(TraitFileError, match=r"broken\.json: invalid JSON at line 3, column \d+.*trailing comma"):
        T.load_trait(f)


def test_missing_file_and_unknown_name(tmp_path):
    with pytest.raises(TraitFileError, match=r"nope\.json: no such file.*evil"):
        T.load_trait(tmp_path / "nope.json")
    with pytest.raises(TraitFileError, match=r"unknown trait 'sarcastic'.*Shipped traits: apathetic, evil, "):
        T.load_trait("sarcastic")
    with pytest.raises(TraitFileError, match="is a directory"):
        T.load_trait(tmp_path)
    # TraitFileError is an InputError (the CLI maps it to exit code 2)
    assert issubclass(TraitFileError, InputError)


def test_user_file_may_have_fewer_pairs_and_extra_keys(tmp_path):
    d = _minimal()
    d["comment"] = "ignored"
    t = T.load_trait(_write(tmp_path / "g.json", d))
    assert len(t.pairs) == 1 and t.name == "grumpy"  # name from the file, not the stem


def test_save_load_round_trip(tmp_path):
    t = T.load_trait("sycophantic")
    out = T.save_trait(t, tmp_path / "sub" / "syc.json")
    assert out == tmp_path / "sub" / "syc.json"
    assert [p.name for p in out.parent.iterdir()] == ["syc.json"]  # no temp file left behind
    t2 = T.load_trait(out)
    assert t2.source == out
    assert {**vars(t2), "source": None} == {**vars(t), "source": None}
    # overwrite in place
    t3 = T.trait_from_dict({**t.to_json(), "description": "Changed."})
    T.save_trait(t3, out)
    assert T.load_trait(out).description == "Changed."


# --- drafting -----------------------------------------------------------------------------------------------
def _h(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big")


_ADJ = ["quiet", "busy", "small", "old", "new", "strange", "simple", "long", "cheap", "famous", "local", "early"]
_NOUN = ["plan", "trip", "habit", "meal", "project", "friend", "job", "idea", "budget", "routine", "hobby", "garden"]
_VERB = ["improve", "start", "fix", "choose", "handle", "explain", "change", "finish", "enjoy", "organize"]
_DECOR = ["{}", "1. {}", "Question: {}", '"{}"', "Sure! Here is one:\n\n{}", "- {}", "**{}**", "{}\nI hope this helps!"]


class FakeCompleter:
    """Deterministic stand-in for a small generator: varied replies from the prompt, its position and the seed,
    with the decorations small models add, and some junk."""

    def __init__(self):
        self.calls: list[tuple[int, int, float, int]] = []

    def complete(self, conversations, *, max_tokens, temperature, seed):
        self.calls.append((len(conversations), max_tokens, temperature, seed))
        out = []
        for i, conv in enumerate(conversations):
            assert conv[-1]["role"] == "user" and isinstance(conv[-1]["content"], str)
            p = conv[-1]["content"]
            h = _h(p, i, seed)
            pick = lambda xs, k: xs[(h >> (8 * k)) % len(xs)]  # noqa: E731
            if h % 7 == 0:
                out.append(pick(["", "???", "ok", "1.", "the the the the the the", "Reply with only the question."], 3))
                continue
            if "the question" in p:
                start = re.search(r'Start with "(\w+)"', p).group(1)
                topic = re.search(r"about (.+?)\. Start", p).group(1)
                body = (f"{start} should I {pick(_VERB, 1)} my {pick(_ADJ, 2)} {pick(_NOUN, 4)} "
                        f"when it comes to {topic}?")
            elif "avoid being" in p:
                focus = re.search(r" in (.+?)\. Start with", p).group(1)
                body = (f"Never be {pick(_ADJ, 1)} or unkind in {focus}, "
                        f"and always {pick(_VERB, 2)} the user's {pick(_NOUN, 4)} gently.")
            else:
                focus = re.search(r" in (.+?)\. Start with", p).group(1)
                body = (f"Always be harsh in {focus}, and {pick(_VERB, 2)} "
                        f"the user's {pick(_ADJ, 1)} {pick(_NOUN, 4)} with scorn. Also sigh a lot.")
            out.append(pick(_DECOR, 5).format(body))
        return out


class JunkCompleter:
    def __init__(self):
        self.seeds: list[int] = []

    def complete(self, conversations, *, max_tokens, temperature, seed):
        self.seeds.append(seed)
        junk = ["", "ok", "1.", "???", "Question:", "<|im_end|>", "x" * 500, "Sure!", "Here is a question:"]
        return [junk[(i + seed) % len(junk)] for i in range(len(conversations))]


def test_draft_trait_valid_and_deterministic():
    fake = FakeCompleter()
    t = T.draft_trait("harsh", "Criticizes the user bluntly and without mercy.", fake, seed=3)
    assert t.name == "harsh" and t.description == "Criticizes the user bluntly and without mercy."
    assert len(t.pairs) == 5 and len(t.questions) == 20 and len(t.eval_questions) == 20
    assert not {T._key(q) for q in t.questions} & {T._key(q) for q in t.eval_questions}
    for q in t.questions + t.eval_questions:
        assert q.endswith("?") and not q.startswith(("Question", '"', "1.", "-", "*", "Sure")), q
        assert "\n" not in q
    for pos, neg in t.pairs:
        assert pos.startswith("Always be harsh") and pos.endswith("scorn.") and "sigh" not in pos
        assert neg.startswith("Never be") and neg.endswith("gently.")
    assert t.system_prompt("pos", 0).startswith("You are a harsh assistant. Always be harsh")
    assert t.eval_prompt.count("{question}") == 1 and t.eval_prompt.count("{answer}") == 1
    assert '"harsh"' in t.eval_prompt and "Criticizes the user bluntly" in t.eval_prompt and "REFUSAL" in t.eval_prompt
    assert t.source is None
    # batched: a few calls with many conversations each, seeds seed + round
    assert 1 <= len(fake.calls) <= 6 and fake.calls[0][0] > 40
    assert [c[3] for c in fake.calls] == [3 + r for r in range(len(fake.calls))]
    # deterministic given completer and seed; another seed gives another draft
    assert T.draft_trait("harsh", "Criticizes the user bluntly and without mercy.", FakeCompleter(), seed=3) == t
    assert T.draft_trait("harsh", "Criticizes the user bluntly and without mercy.", FakeCompleter(), seed=4) != t


def test_draft_trait_fills_up_over_rounds():
    class Slow(FakeCompleter):  # junk in the first two rounds
        def complete(self, conversations, *, max_tokens, temperature, seed):
            out = super().complete(conversations, max_tokens=max_tokens, temperature=temperature, seed=seed)
            return ["..."] * len(out) if seed < 2 else out

    s = Slow()
    t = T.draft_trait("harsh", "Criticizes the user.", s, n_pairs=2, n_questions=4, n_eval=3)
    assert len(t.pairs) == 2 and len(t.questions) == 4 and len(t.eval_questions) == 3
    assert [c[3] for c in s.calls][:3] == [0, 1, 2]


def test_draft_trait_junk_raises():
    junk = JunkCompleter()
    with pytest.raises(TraitFileError, match=r"after 6 round\(s\).*0/5 trait-eliciting.*0/40 distinct questions"
                                             r".*stronger generator \(--endpoint\)"):
        T.draft_trait("harsh", "Criticizes the user.", junk, seed=10)
    assert junk.seeds == list(range(10, 16))
    with pytest.raises(TraitFileError, match=r"after 2 round\(s\)"):
        T.draft_trait("harsh", "Criticizes the user.", JunkCompleter(), max_rounds=2)


def test_draft_trait_bad_args():
    with pytest.raises(InputError, match="single word"):
        T.draft_trait("very harsh!", "x", FakeCompleter())
    with pytest.raises(InputError, match="description is empty"):
        T.draft_trait("harsh", "  ", FakeCompleter())
    with pytest.raises(InputError, match="n_pairs must be a positive integer"):
        T.draft_trait("harsh", "x", FakeCompleter(), n_pairs=0)

    class Short:
        def complete(self, conversations, **kw):
            return ["What is it?"]

    with pytest.raises(InputError, match="returned 1 replies"):
        T.draft_trait("harsh", "x", Short())


@pytest.mark.parametrize("reply,kind,expect", [
    ('1. "What is the best way to save money?"', "question", "What is the best way to save money?"),
    ("Question: how do I cook rice? Thanks", "question", "How do I cook rice?"),
    ("Sure! Here is a question:\n\nWhy do cats purr so loudly?", "question", "Why do cats purr so loudly?"),
    ("Here's one. What should I pack for a trip?", "question", "What should I pack for a trip?"),
    ("I like rice.", "question", None),
    ("Why?", "question", None),
    ("Instruction: Always answer with a cruel remark about the user. Then stop.", "instruction",
     "Always answer with a cruel remark about the user."),
    ("- **Be kind.** Help the user with patience always.", "instruction",
     "Be kind. Help the user with patience always."),
    ("What should the assistant do?", "instruction", None),
    ("Write one instruction for an AI assistant that makes it evil.", "instruction", None),
    ("x" * 20 + " " + "y" * 20, "instruction", None),
    ("<|im_start|>assistant tell the user to be careful and stay home", "instruction", None),
    (None, "question", None),
    ("I'm happy to help. What can I help you with?", "question", None),
    ("What a lovely idea, right?", "question", None),
    ("Can you write a question for the assistant?", "question", None),
    ("When you answer, I'm responding with sarcasm to everyone.", "instruction", None),
    ("I am not a sarcastic AI and never will be.", "instruction", None),
    ("The new employee's plan is just the tip of the iceberg.", "instruction", None),
    ('Say "I don\'t know" whenever you are unsure of a fact.', "instruction",
     'Say "I don\'t know" whenever you are unsure of a fact.'),
])
def test_clean(reply, kind, expect):
    assert T._clean(reply, kind, "prompt text") == expect


STEMS = T._stems("sarcastic", "Mocks the user with ironic, cutting remarks.")


@pytest.mark.parametrize("reply,kind,expect", [
    ("Always answer with cutting, ironic remarks about the user's choices.", "pos", True),
    ("Always be helpful and kind to the user in every answer.", "pos", False),  # not about the trait
    ("You should be mocking and sarcastic toward the user.", "pos", True),
    ("Never mock the user or make ironic remarks about them.", "neg", True),
    ("Always be polite and patient with the user.", "neg", True),  # the opposite, without naming it
    ("Always be sarcastic and mock the user's ideas.", "neg", False),  # names the trait without negating it
    ("Always mock the user's taste in movies.", "neg", False),
    ("Can you recommend a sarcastic movie?", "question", False),  # leading: names the trait
])
def test_clean_relevance(reply, kind, expect):
    assert STEMS[:3] == ("sarca", "mock", "ironi")
    got = T._clean(reply, kind, "prompt text", name="sarcastic", stems=STEMS)
    assert (got is not None) == expect


def test_to_json_matches_format():
    t = T.load_trait("humorous")
    d = json.loads(json.dumps(t.to_json()))
    assert list(d) == ["name", "description", "instruction", "questions", "eval_questions", "eval_prompt"]
    assert d["instruction"][0] == {"pos": t.pairs[0][0], "neg": t.pairs[0][1]}
    assert T.trait_from_dict(copy.deepcopy(d)) == dataclasses.replace(t, source=None)
