"""Each tenant its own prefix cache in vLLM: the `cache_salt` the guard sets.

vLLM reuses cached KV blocks across requests whose prompts share a prefix — unless their
`cache_salt`s differ. Shared, one tenant could time whether another sent a given prefix
recently. So every request gets a salt derived from a secret, its tenant and the salt its
client sent, if any: HMAC-SHA256(secret, tenant NUL client salt), URL-safe base64 (43
characters, none of the `/`, `@`, `\\` or NUL vLLM refuses). A client choosing a salt still
gets one of its own tenant's: it can partition its own cache, never join another's.
Tenants with `share_prefix_cache: true` get no salt (theirs, if sent, passes unchanged).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable

from vllm_guard.core.classes import Tenant
from vllm_guard.proxy.responses import ErrorResponse, bad_request


class CacheSalts:
    def __init__(self, secret: bytes, tenants: Iterable[Tenant]) -> None:
        self._secret = secret
        # The common case (no client salt) costs a dict lookup.
        self._plain = {t.name: self._derive(t.name, "") for t in tenants}

    def for_request(self, tenant: Tenant, client_salt: object) -> str | ErrorResponse | None:
        """The salt to send (None: send the body's as it is), or a 400."""
        if client_salt is not None and not isinstance(client_salt, str):
            return bad_request("cache_salt must be a string", "cache_salt")
        if tenant.share_prefix_cache:
            return None
        if not client_salt:
            return self._plain[tenant.name]
        return self._derive(tenant.name, client_salt)

    def _derive(self, tenant: str, client_salt: str) -> str:
        message = tenant.encode() + b"\0" + client_salt.encode("utf-8", "surrogatepass")
        digest = hmac.new(self._secret, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
