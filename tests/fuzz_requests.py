"""Hypothesis strategies for the guard's request path: generation requests built from the
shapes of OpenAI's request schemas (chat and completions, with vLLM's extensions), then
mutated: wrong types, huge and odd numbers, nesting, encodings, duplicate and missing
fields, broken JSON; and the headers around them. Shared by the unit fuzzer (the app and a
stand-in engine) and the integration one (the real stack)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

KEYS = {"chat": b"Bearer chat-secret", "etl": b"Bearer etl-secret"}


@dataclass
class FuzzCase:
    path: str
    headers: list[tuple[bytes, bytes]]
    body: bytes
    leave_early: bool  # the client disconnects after the first piece of the answer

    def __repr__(self) -> str:  # hypothesis prints this for a failing case
        return f"FuzzCase({self.path!r}, {self.headers!r}, {self.body[:300]!r}, {self.leave_early})"


_text = st.text(max_size=40)
_odd_numbers = st.sampled_from(
    [0, -1, 1, 2, 3, 16, 2**31, 2**63, 10**400, 1.5, 7.0, -0.0, True, False, "5", " 7 ",
     "1_0", "1e3", "", "x", None, [], {}, [3]]
)  # fmt: skip
_number = st.one_of(st.integers(-5, 50), _odd_numbers)
_content = st.one_of(
    _text,
    st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": _text}), max_size=3),
    st.none(),
    _number,
)
_message = st.one_of(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant", "tool", "x"]), "content": _content}
    ),
    _text,
    st.none(),
)
_prompt = st.one_of(
    _text,
    st.lists(_text, max_size=5),
    st.lists(st.integers(0, 500), max_size=8),
    st.lists(st.lists(st.integers(0, 500), max_size=4), max_size=4),
    _number,
    st.none(),
)
_json_value = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), _text),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_text, inner, max_size=3)),
    max_leaves=8,
)
_optional_fields = {
    "model": st.one_of(st.just("tiny"), _text, _number),
    "max_tokens": _number,
    "max_completion_tokens": _number,
    "n": _number,
    "stream": st.one_of(st.booleans(), _number),
    "stream_options": st.one_of(
        st.fixed_dictionaries({"include_usage": st.one_of(st.booleans(), _number)}), _number
    ),
    "temperature": st.one_of(st.floats(0, 2), _number),
    "priority": _number,
    "use_beam_search": st.one_of(st.booleans(), _number),
    "best_of": _number,
    "prompt_embeds": st.one_of(_text, st.lists(_text, max_size=2)),
    "ignore_eos": st.booleans(),
    "stop": st.one_of(_text, st.lists(_text, max_size=3)),
    "extra": _json_value,
}


@st.composite
def _payload(draw: st.DrawFn, chat: bool) -> dict[str, Any]:
    payload: dict[str, Any] = {}
    if draw(st.integers(0, 9)):  # the main field, usually there
        if chat:
            payload["messages"] = draw(st.one_of(st.lists(_message, max_size=4), _number))
        else:
            payload["prompt"] = draw(_prompt)
    for name, strategy in _optional_fields.items():
        if draw(st.integers(0, 4)) == 0:
            payload[name] = draw(strategy)
    if "max_tokens" not in payload and draw(st.booleans()):
        payload["max_tokens"] = draw(st.integers(1, 8))  # keep most answers short
    return payload


def _encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False).encode("utf-8", "surrogatepass")


_mutations = st.sampled_from(
    ["none"] * 16
    + ["truncate", "garbage", "duplicate_key", "deep", "not_utf8", "bom", "nan", "array", "empty"]
)


@st.composite
def _body(draw: st.DrawFn, chat: bool) -> bytes:
    body = _encode(draw(_payload(chat)))
    mutation = draw(_mutations)
    if mutation == "truncate":
        return body[: draw(st.integers(0, max(0, len(body) - 1)))]
    if mutation == "garbage":
        at = draw(st.integers(0, len(body)))
        return body[:at] + draw(st.binary(min_size=1, max_size=8)) + body[at:]
    if mutation == "duplicate_key":  # the last one wins, in Python's parser and in vLLM's
        extra = draw(st.sampled_from([b'"max_tokens": "9"', b'"n": 3', b'"stream": true']))
        return body[:-1] + (b", " if len(body) > 2 else b"") + extra + b"}"
    if mutation == "deep":
        depth = draw(st.sampled_from([50, 900, 5000, 200_000]))
        return (
            body[:-1]
            + (b", " if len(body) > 2 else b"")
            + b'"d": '
            + b"[" * depth
            + b"]" * depth
            + b"}"
        )
    if mutation == "not_utf8":
        return body[:-1] + b', "x": "\xff\xfe\xc3"}'
    if mutation == "bom":
        return b"\xef\xbb\xbf" + body
    if mutation == "nan":
        value = draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity"]))
        return body[:-1] + (b", " if len(body) > 2 else b"") + b'"temperature": ' + value + b"}"
    if mutation == "array":
        return b"[" + body + b"]"
    if mutation == "empty":
        return b""
    return body


@st.composite
def fuzz_cases(draw: st.DrawFn, keys: dict[str, bytes] = KEYS) -> FuzzCase:
    chat = draw(st.booleans())
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = draw(_body(chat))
    headers: list[tuple[bytes, bytes]] = []
    auth = draw(st.sampled_from(["chat"] * 4 + ["etl"] * 4 + ["none", "wrong", "twice", "basic"]))
    if auth in keys:
        headers.append((b"authorization", keys[auth]))
    elif auth == "wrong":
        headers.append((b"authorization", b"Bearer " + draw(st.binary(max_size=20))))
    elif auth == "twice":
        headers += [(b"authorization", keys["chat"]), (b"authorization", keys["etl"])]
    elif auth == "basic":
        headers.append((b"authorization", b"Basic Y2hhdA=="))
    klass = draw(st.sampled_from([None] * 6 + [b"batch", b"interactive", b"vip", b"\xff\x00"]))
    if klass is not None:
        headers.append((b"x-vllm-guard-class", klass))
    if draw(st.integers(0, 9)) == 0:
        headers.append((b"x-vllm-priority", b"-100"))
    length = draw(st.sampled_from(["right"] * 6 + ["none"] * 2 + ["huge", "junk"]))
    if length == "right":
        headers.append((b"content-length", b"%d" % len(body)))
    elif length == "huge":
        headers.append((b"content-length", b"%d" % (2**40)))
    elif length == "junk":
        headers.append((b"content-length", b"12abc"))
    return FuzzCase(path, headers, body, draw(st.integers(0, 7)) == 0)
