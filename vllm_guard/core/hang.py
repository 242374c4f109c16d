"""Is the engine hung? Two signals that move only while the engine works, judged with the
clock passed in (synchronous, no I/O; `engine/watchdog.py` feeds it).

- Its health probe: vLLM's API server answers `/health` within a short deadline. A stopped
  API server (SIGSTOP, a wedged event loop) answers nothing, while its port still accepts
  connections.
- Its progress: vLLM's token counters (prompt + generated) or its KV-cache use change
  whenever it has requests (a long prefill, whose prompt tokens are counted only when it
  ends, still takes KV blocks chunk by chunk). On the CPU build the engine core is a
  separate process; when it stops, the API server still answers `/health` (it only looks
  at an error flag) and `/metrics` with frozen numbers: requests running, nothing moving.

Hung: no successful probe for `after_s`, or requests in the engine and nothing moving for
`after_s`.
"""

from __future__ import annotations


class HangDetector:
    def __init__(self, after_s: float, now: float) -> None:
        self.after_s = after_s
        self.reset(now)

    def reset(self, now: float) -> None:
        """Start over (the engine was restarted, or is starting)."""
        self._healthy_at = now
        self._progress_at = now
        self._work: object = None
        self._busy = False
        self.hung_since: float | None = None

    def health(self, ok: bool, now: float) -> None:
        if ok:
            self._healthy_at = now

    def progress(self, work: object, busy: bool, now: float) -> None:
        """`work`: what moves while the engine works (its token counters and KV use; None:
        unknown); `busy`: it reports requests running or waiting."""
        if not busy or (work is not None and work != self._work) or not self._busy:
            self._progress_at = now
        self._work = work if work is not None else self._work
        self._busy = busy

    def hung(self, now: float) -> str | None:
        """Why the engine counts as hung now; None if it does not."""
        reason = None
        if now - self._healthy_at >= self.after_s:
            reason = f"its health probe went unanswered for {now - self._healthy_at:.0f} s"
        elif self._busy and now - self._progress_at >= self.after_s:
            reason = f"it has requests but produced no token for {now - self._progress_at:.0f} s"
        if reason is None:
            self.hung_since = None
        elif self.hung_since is None:
            self.hung_since = now
        return reason
