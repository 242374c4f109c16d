"""The guard process's request path, in order: the HTTP connection (`http_server`), the ASGI
app (`app`: auth -> class -> body -> quota -> admission -> forward -> settle), and the
asyncio side of the core's decisions (`quota_gate`, `admission_gate`), responses, usage and
metrics; `server` wires it to uvicorn."""
