"""The batch runner's file handling: validation, resume, exactly-once output."""

from __future__ import annotations

import argparse
import json
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

from vllm_guard.client.batch import check_input, read_done, run_batch
from vllm_guard.engine.launcher import free_port
from vllm_guard.testing.stack import stop, wait_healthy


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


def _args(src: Path, out: Path, url: str, workers: int = 8) -> argparse.Namespace:
    return argparse.Namespace(
        input=src, output=out, base_url=url, api_key="k", priority_class="", model=None,
        workers=workers, rpm=None, tpm=None, max_attempts=1, progress=False, retry_failed=False,
    )  # fmt: skip


def test_a_write_error_stops_the_run_at_once_with_one_line_and_intact_output(tmp_path: Path):
    """The output cannot grow past 8 KiB (RLIMIT_FSIZE: writes fail with EFBIG, as on a
    full disk): the run must end promptly, non-zero, with one line naming the cause and no
    traceback, every line written before intact — not hang with a dead worker."""
    port = free_port()
    engine = subprocess.Popen(
        [sys.executable, "-m", "tests.unit.fake_upstream", "--port", str(port)],
        stdout=subprocess.DEVNULL,
    )
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(_line(i) + "\n" for i in range(3000)))

    def small_files() -> None:  # pragma: no cover - runs in the child
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))

    try:
        wait_healthy(f"http://127.0.0.1:{port}", engine, 30)
        cmd = [
            sys.executable, "-m", "vllm_guard", "batch", str(src), "-o", str(out),
            "--base-url", f"http://127.0.0.1:{port}", "--api-key", "k", "--max-attempts", "1",
        ]  # fmt: skip
        t0 = time.monotonic()
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=60, preexec_fn=small_files, check=False
        )
        took = time.monotonic() - t0
    finally:
        stop(engine)
    assert done.returncode == 3, done.stderr[-2000:]
    assert took < 30
    assert "Traceback" not in done.stderr
    message = [line for line in done.stderr.splitlines() if "stopped" in line]
    assert len(message) == 1 and "File too large" in message[0], done.stderr[-2000:]
    lines = out.read_bytes().split(b"\n")
    complete = [json.loads(line) for line in lines[:-1]]
    assert complete and all(r["error"] is None for r in complete)
    assert read_done(out) == {r["custom_id"] for r in complete}  # a torn last line is cut


async def test_a_lone_surrogate_in_an_answer_is_written_as_valid_json(tmp_path: Path, fake):
    fake.mode = "surrogate"
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(_line(i) + "\n" for i in range(3)))
    assert await run_batch(_args(src, out, fake.url)) == 0
    records = [json.loads(line) for line in out.read_bytes().decode("utf-8").splitlines()]
    assert [r["response"]["body"]["choices"][0]["text"] for r in records] == ["hi \ud800"] * 3


def test_resume_skips_a_bad_line_in_the_middle_and_records_without_custom_id(
    tmp_path: Path, capsys
):
    out = tmp_path / "out.jsonl"
    a = json.dumps({"custom_id": "a", "response": None, "error": None})
    c = json.dumps({"custom_id": "c", "response": None, "error": None})
    out.write_text(f'{a}\n{{"torn in the middle\n{{"no": "custom_id"}}\n[1]\n{c}\n')
    assert read_done(out) == {"a", "c"}  # c, after the bad lines, is not lost
    warned = capsys.readouterr().err
    assert "line 2" in warned and "line 3" in warned and "line 4" in warned
    assert out.read_text().endswith(c + "\n")


async def test_an_output_that_cannot_be_opened_is_one_line_and_exit_3(tmp_path: Path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(_line(1) + "\n")
    out = tmp_path / "missing-dir" / "out.jsonl"
    assert await run_batch(_args(src, out, "http://127.0.0.1:9")) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot use" in err and "Traceback" not in err
