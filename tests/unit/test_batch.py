"""The batch runner's file handling: validation, resume, exactly-once output."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vllm_guard.client.batch import check_input, read_done, run_batch


def _line(i: int, **over) -> str:
    rec = {
        "custom_id": f"r{i}",
        "method": "POST",
        "url": "/v1/completions",
        "body": {"model": "tiny", "prompt": f"line {i}", "max_tokens": 2},
    }
    return json.dumps({**rec, **over})


def test_every_bad_line_is_reported_with_its_number(tmp_path: Path):
    f = tmp_path / "in.jsonl"
    f.write_text(
        "\n".join(
            [
                _line(1),
                "{not json",
                _line(3, method="GET"),
                _line(4, url="/v1/embeddings"),
                _line(1),  # duplicate of line 1
                json.dumps({"method": "POST", "url": "/v1/completions", "body": {}}),
                _line(7, body="text"),
                "[1, 2]",
            ]
        )
        + "\n"
    )
    total, errors = check_input(f)
    assert total == 8
    assert [e.split(":")[0] for e in errors] == [f"line {n}" for n in (2, 3, 4, 5, 6, 7, 8)]
    assert "duplicate custom_id 'r1'" in errors[3]


def test_a_torn_last_line_is_cut_and_done_ids_are_kept(tmp_path: Path):
    out = tmp_path / "out.jsonl"
    good = [json.dumps({"custom_id": f"r{i}", "response": None, "error": None}) for i in (1, 2)]
    out.write_text("\n".join(good) + '\n{"custom_id": "r3", "resp')
    assert read_done(out) == {"r1", "r2"}
    assert out.read_text() == "\n".join(good) + "\n"


async def test_runs_against_a_server_writes_each_line_once_and_resumes(tmp_path: Path, fake):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(_line(i) + "\n" for i in range(40)))
    out = tmp_path / "out.jsonl"
    out.write_text(
        json.dumps({"custom_id": "r0", "response": {"status_code": 200}, "error": None}) + "\n"
    )
    args = argparse.Namespace(
        input=src, output=out, base_url=fake.url, api_key="k", priority_class="batch",
        model=None, workers=8, rpm=None, tpm=None, max_attempts=3, progress=False,
        retry_failed=False,
    )  # fmt: skip
    assert await run_batch(args) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["custom_id"] for r in records) == sorted(f"r{i}" for i in range(40))
    assert len(fake.requests) == 39  # r0 was done before
    headers, body = fake.requests[0]
    assert headers["x-vllm-guard-class"] == "batch" and body["max_tokens"] == 2
    ok = [r for r in records if r["custom_id"] != "r0"]
    assert all(r["response"]["status_code"] == 200 and r["error"] is None for r in ok)


async def test_invalid_input_sends_nothing(tmp_path: Path, fake):
    src = tmp_path / "in.jsonl"
    src.write_text(_line(1) + "\n" + _line(1) + "\n")
    args = argparse.Namespace(
        input=src, output=tmp_path / "out.jsonl", base_url=fake.url, api_key="k",
        priority_class="", model=None, workers=2, rpm=None, tpm=None, max_attempts=1,
        progress=False, retry_failed=False,
    )  # fmt: skip
    assert await run_batch(args) == 2
    assert fake.requests == [] and not (tmp_path / "out.jsonl").exists()


def test_retry_failed_drops_failure_records_so_they_run_again(tmp_path: Path):
    out = tmp_path / "out.jsonl"
    ok = json.dumps({"custom_id": "a", "response": {"status_code": 200}, "error": None})
    bad = json.dumps({"custom_id": "b", "response": None, "error": {"code": "x"}})
    out.write_text(ok + "\n" + bad + "\n")
    assert read_done(out) == {"a", "b"}
    assert read_done(out, retry_failed=True) == {"a"}
    assert out.read_text() == ok + "\n"
