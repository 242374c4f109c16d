"""The guard process's request path, in order: the HTTP connection (`http_server`), the ASGI
app (`app`) and the generation request's stages (`generation`: auth -> class -> body ->
quota -> admission -> forward -> settle), the asyncio side of the core's decisions
(`quota_gate`, `admission_gate`), responses, usage and metrics; `server` wires it to
uvicorn."""
