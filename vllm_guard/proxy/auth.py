"""API key -> tenant.

The presented key is hashed with SHA-256 and its digest compared with every configured
digest by `hmac.compare_digest`, without stopping at a match: the time taken depends only
on the number of configured keys. Keys are neither stored nor logged, only digests.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

from vllm_guard.core.classes import Tenant

_BEARER = b"bearer "


class Authenticator:
    def __init__(self, key_digests: Mapping[bytes, Tenant], anonymous: Tenant | None) -> None:
        self._entries = tuple(key_digests.items())
        self._anonymous = anonymous

    def tenant_for(self, authorization: bytes | None) -> Tenant | None:
        """The tenant for an `Authorization` header value, or None (answer 401).

        No header at all maps to the anonymous tenant when the config names one; a wrong key
        is always refused, so a typo never silently lands in the anonymous tenant's quota.
        """
        if authorization is None:
            return self._anonymous
        if authorization[:7].lower() != _BEARER:
            return None
        digest = hashlib.sha256(authorization[7:].strip()).digest()
        found = None
        for known, tenant in self._entries:
            if hmac.compare_digest(known, digest):
                found = tenant
        return found
