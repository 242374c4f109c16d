"""`vllm-guard batch`: an OpenAI Batch API file through the rate-limited client.

    vllm-guard batch INPUT.jsonl -o OUTPUT.jsonl [--base-url URL] [--api-key KEY] ...

Input: one request per line, `{"custom_id", "method": "POST", "url", "body"}` with url
`/v1/chat/completions` or `/v1/completions`. The whole file is checked first, streaming:
lines that are not JSON objects, lack a field, use another method or url, or repeat a
custom_id are all reported with their line numbers and nothing is sent (exit 2) — a
partially valid job is a job to fix, not to half-run.

Output: one line per input line, exactly once, in OpenAI's batch output format:
`{"id", "custom_id", "response": {"status_code", "request_id", "body"} | null, "error":
{"code", "message"} | null}`. A request answered with a non-2xx status (after retries, for
retryable ones) is a failure record with the server's error body in `response` and
`error` set; one that never got an answer (retries exhausted on connection errors) has
`response: null`. Nothing is ever silently missing or mixed into the results.

Resumable: the output is appended to, one whole line per `write` (flushed at once); on
start, an existing output is read, a torn last line (a crash mid-write) is cut off, and
the custom_ids already there are skipped (`--retry-failed` drops the failure records
first, so those lines run again). SIGKILL at any moment loses only requests that
had not been written; Ctrl-C stops sending, lets in-flight requests finish (a second
Ctrl-C abandons them; they are redone on resume). Memory stays flat: the input is streamed
through a bounded queue to a fixed pool of workers; only the custom_ids are kept.

Exit code: 0 when every line succeeded, 1 when any failed, 2 for invalid input, 3 when the
run stopped on an error of its own (the output cannot be written, say): one line names it,
and every line written before it is intact.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from vllm_guard.client.limited import LimitedClient, Response, RetriesExhausted

ALLOWED_URLS = frozenset({"/v1/chat/completions", "/v1/completions"})
MAX_REPORTED_ERRORS = 20


@dataclass(frozen=True, slots=True)
class Item:
    line: int
    custom_id: str
    url: str
    body: dict[str, Any]


def check_input(path: Path) -> tuple[int, list[str]]:
    """Count the lines and list what is wrong with them (line numbers from 1)."""
    errors: list[str] = []
    seen: set[str] = set()
    n = 0
    for n, parsed in enumerate(parse_lines(path), start=1):
        if isinstance(parsed, str):
            errors.append(f"line {n}: {parsed}")
        elif parsed.custom_id in seen:
            errors.append(f"line {n}: duplicate custom_id {parsed.custom_id!r}")
        else:
            seen.add(parsed.custom_id)
    return n, errors


def parse_lines(path: Path) -> Iterator[Item | str]:
    """Each line of a batch file: an `Item`, or the error that makes it invalid (as text)."""
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            yield _parse(n, raw)


def _parse(n: int, raw: bytes) -> Item | str:
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        return f"not JSON ({exc})"
    if not isinstance(obj, dict):
        return "not a JSON object"
    custom_id, method, url, body = (obj.get(k) for k in ("custom_id", "method", "url", "body"))
    if not isinstance(custom_id, str) or not custom_id:
        return "custom_id missing or not a non-empty string"
    if method != "POST":
        return f"method must be POST (got {method!r})"
    if url not in ALLOWED_URLS:
        return f"url must be one of {sorted(ALLOWED_URLS)} (got {url!r})"
    if not isinstance(body, dict):
        return "body missing or not an object"
    return Item(n, custom_id, url, body)


def read_done(path: Path, retry_failed: bool = False) -> set[str]:
    """custom_ids already in an output file; a torn last line is cut off first. With
    `retry_failed`, failure records are removed from the file (rewritten atomically) so
    those lines run again and the output still has each custom_id once."""
    if not path.is_file():  # nothing yet, or not a file to resume from (/dev/stdout)
        return set()
    done: set[str] = set()
    kept: list[bytes] = []
    good_end = 0
    with path.open("rb+") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.endswith(b"\n"):
                break  # torn by a crash mid-write: cut off below
            good_end += len(raw)
            try:
                record = json.loads(raw)
            except ValueError:
                record = None
            custom_id = record.get("custom_id") if isinstance(record, dict) else None
            if not isinstance(custom_id, str):
                print(
                    f"{path}: line {n} is not an output record; skipped (its request, if any, "
                    "runs again)",
                    file=sys.stderr,
                )
                continue
            if retry_failed and record.get("error") is not None:
                continue
            done.add(custom_id)
            kept.append(raw)
        f.truncate(good_end)
    if retry_failed:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(b"".join(kept))
        os.replace(tmp, path)
    return done


class Runner:
    def __init__(
        self,
        client: LimitedClient,
        out: TextIO,
        workers: int,
        total: int,
        done_before: int,
        model: str | None = None,
    ) -> None:
        self.client = client
        self.out = out
        self.workers = workers
        self.total = total
        self.done_before = done_before
        self.model = model
        self.ok = 0
        self.failed = 0
        self.stopping = False
        self.started = time.monotonic()

    async def run(self, items: Iterator[Item]) -> None:
        """Send every item; raises (at once, everything else cancelled) the first error a
        worker meets that is not an answer: the output cannot be written, say."""
        queue: asyncio.Queue[Item | None] = asyncio.Queue(maxsize=2 * self.workers)
        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(self.workers):
                    group.create_task(self._worker(queue))
                group.create_task(self._produce(items, queue))
        except BaseExceptionGroup as errors:
            raise errors.exceptions[0] from None

    async def _produce(self, items: Iterator[Item], queue: asyncio.Queue[Item | None]) -> None:
        for item in items:
            if self.stopping:
                break
            await queue.put(item)
        for _ in range(self.workers):
            await queue.put(None)

    async def _worker(self, queue: asyncio.Queue[Item | None]) -> None:
        while (item := await queue.get()) is not None:
            body = item.body if self.model is None else {**item.body, "model": self.model}
            resp: Response | None
            try:
                resp = await self.client.post(item.url, body)
                error = None if resp.ok else _error_of(resp)
            except RetriesExhausted as exc:
                resp = exc.last if isinstance(exc.last, Response) else None
                error = {"code": "retries_exhausted", "message": str(exc)}
            self._write(item, resp, error)

    def _write(self, item: Item, resp: Response | None, error: dict[str, Any] | None) -> None:
        record = {
            "id": f"batch_req_{uuid.uuid4().hex}",
            "custom_id": item.custom_id,
            "response": None
            if resp is None
            else {
                "status_code": resp.status,
                "request_id": resp.headers.get("x-request-id", ""),
                "body": resp.body,
            },
            "error": error,
        }
        line = json.dumps(record, ensure_ascii=False)
        try:
            line.encode()
        except UnicodeEncodeError:  # a lone surrogate (JSON allows "\ud800"): escape it
            line = json.dumps(record)
        # One write of one whole line, flushed: a crash leaves at most a torn last line,
        # which the next run cuts off.
        self.out.write(line + "\n")
        self.out.flush()
        if error is None:
            self.ok += 1
        else:
            self.failed += 1

    # -- display -------------------------------------------------------------------------

    def eta_s(self) -> float:
        done = self.ok + self.failed
        left = self.total - self.done_before - done
        elapsed = time.monotonic() - self.started
        return left * elapsed / done if done else float("nan")

    def status_line(self) -> str:
        s = self.client.stats
        p95 = s.latency_p95_s()
        return (
            f"done {self.done_before + self.ok + self.failed}/{self.total} "
            f"(failed {self.failed}) | in flight {s.in_flight} | retrying {s.retrying} | "
            f"concurrency {self.client.concurrency_limit} | tokens {s.tokens} | "
            f"429 rate {s.hit_rate:.1%} | p95 {p95:.2f} s | ETA {self.eta_s():.0f} s"
        )


def _error_of(resp: Response) -> dict[str, Any]:
    body: dict[str, Any] = resp.body if isinstance(resp.body, dict) else {}
    found = body.get("error")
    err: dict[str, Any] = found if isinstance(found, dict) else {}
    return {
        "code": str(err.get("code") or f"http_{resp.status}"),
        "message": str(err.get("message") or f"HTTP {resp.status}"),
    }


async def _display(runner: Runner, live: bool) -> None:
    if live:
        from rich.live import Live
        from rich.text import Text

        with Live(Text(runner.status_line()), refresh_per_second=4, transient=False) as view:
            while True:
                view.update(Text(runner.status_line()))
                await asyncio.sleep(0.25)
    else:
        while True:
            await asyncio.sleep(5)
            print(runner.status_line(), file=sys.stderr, flush=True)


async def run_batch(args: argparse.Namespace) -> int:
    total, errors = check_input(args.input)
    if errors:
        for e in errors[:MAX_REPORTED_ERRORS]:
            print(f"{args.input}: {e}", file=sys.stderr)
        if len(errors) > MAX_REPORTED_ERRORS:
            print(f"... and {len(errors) - MAX_REPORTED_ERRORS} more", file=sys.stderr)
        print(f"{len(errors)} invalid line(s); nothing was sent", file=sys.stderr)
        return 2
    try:
        done = read_done(args.output, args.retry_failed)
        out = args.output.open("a", encoding="utf-8")
    except OSError as exc:
        print(f"vllm-guard batch: cannot use {args.output}: {exc}", file=sys.stderr)
        return 3
    todo = (p for p in parse_lines(args.input) if isinstance(p, Item) and p.custom_id not in done)
    headers = {"x-vllm-guard-class": args.priority_class} if args.priority_class else {}
    client = LimitedClient(
        args.base_url,
        args.api_key or os.environ.get("OPENAI_API_KEY"),
        requests_per_minute=args.rpm,
        tokens_per_minute=args.tpm,
        max_concurrency=args.workers,
        max_attempts=args.max_attempts,
        headers=headers,
    )
    loop = asyncio.get_running_loop()
    stopped: BaseException | None = None
    try:
        runner = Runner(client, out, args.workers, total, len(done), args.model)
        main = asyncio.current_task()
        assert main is not None

        def on_sigint() -> None:
            if runner.stopping:
                main.cancel()  # second Ctrl-C: abandon in-flight requests
            runner.stopping = True
            print("\nstopping: finishing in-flight requests (Ctrl-C again to abandon)",
                  file=sys.stderr)  # fmt: skip

        loop.add_signal_handler(signal.SIGINT, on_sigint)
        display = asyncio.create_task(_display(runner, args.progress and sys.stderr.isatty()))
        try:
            await runner.run(todo)
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # not an answer: the run cannot go on
            stopped = exc
        finally:
            display.cancel()
            loop.remove_signal_handler(signal.SIGINT)
            await client.close()
    finally:
        with contextlib.suppress(OSError):  # a flush that failed once fails again here
            out.close()
    if stopped is not None:
        where = f"cannot write {args.output}: " if isinstance(stopped, OSError) else ""
        print(
            f"vllm-guard batch: stopped: {where}{type(stopped).__name__}: {stopped}; "
            f"{runner.ok + runner.failed} line(s) written this run are intact, run again to "
            "resume",
            file=sys.stderr,
        )
        return 3
    s = client.stats
    written = runner.ok + runner.failed
    print(
        f"{args.output}: {written} written this run ({runner.ok} ok, {runner.failed} failed), "
        f"{len(done)} from before, {total - len(done) - written} not done; "
        f"{s.requests} requests sent, {s.rate_limited} rate-limited ({s.hit_rate:.1%}), "
        f"{s.retries} retries, {s.tokens} tokens, p95 latency {s.latency_p95_s():.2f} s",
        file=sys.stderr,
    )
    if runner.failed or total - len(done) - written:
        return 1
    return 0


def main_batch(args: argparse.Namespace) -> int:
    if not args.input.is_file():
        print(f"vllm-guard batch: {args.input}: no such file", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(run_batch(args))
    return 1
