"""The decision core: tenant quotas (token buckets), admission (slots, KV, fair queues), the
cost of a request, and the compiled classes and tenants they work on. Synchronous, no I/O,
no asyncio, no pydantic: `now` is passed in, so tests run on a manual clock."""
