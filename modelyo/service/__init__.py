"""What the Modelyo services (the CA and the TDX agent) share, apart from their business logic.

- `errors`: the refusals a service raises, each carrying its HTTP status and API error code.
- `state`: private state directories, the one-process lock, and the create-once primitive
  that decides ownership exactly once.
- `tls`, `http`, `runner`: serving a FastAPI application over uvicorn with TLS 1.3, the verified
  client certificate in the ASGI scope, the `{"error", "detail"}` error bodies, a ready line and
  clean signal handling. These import fastapi/uvicorn, which only the `ca` and `agent` extras
  install; `errors` and `state` need nothing beyond the core.
"""
