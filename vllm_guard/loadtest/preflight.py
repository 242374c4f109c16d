"""What `vllm-guard tune` checks before it sends any load: the stack answers, and both keys
are keys of the config it was given and of the guard it is about to load. A sweep takes
minutes; a wrong URL or key should cost seconds, and say which."""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from vllm_guard.config import CompiledConfig

TIMEOUT_S = 10.0


def problem(
    url: str, config: CompiledConfig, source: Path, keys: Sequence[tuple[str, str]]
) -> str | None:
    """Why the sweep cannot run, or None. `keys`: (flag name, key) pairs."""
    status = _status(url + "/health", None)
    if isinstance(status, str):
        return f"cannot reach the guard at {url} ({status}); is vllm-guard running there?"
    if status != 200:
        return f"{url}/health answered {status}: the engine behind the guard is not ready"
    for flag, key in keys:
        tenant = config.key_digests.get(hashlib.sha256(key.encode()).digest())
        if tenant is None:
            return f"{flag} is not a key of any tenant in {source}"
        status = _status(url + "/v1/models", key)
        if status == 401:
            return (
                f"the guard at {url} refuses {flag} (401): it runs with another limits file "
                f"or other keys than {source}"
            )
        if status != 200:
            return f"{url}/v1/models answered {status} for {flag}"
    return None


def _status(url: str, key: str | None) -> int | str:
    """The HTTP status of a GET, or why there was none."""
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S
        ) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return str(reason) or type(exc).__name__
