"""The OpenAI-compatible HTTP front end: FastAPI routes over the same registry, cache, keys and metrics as gRPC.

JSON stops here, as protobuf stops at the servicers: `schemas` parses requests into the engines' dataclasses,
`routes` answers in OpenAI's shapes (SSE for streams), `errors` maps domain errors to HTTP statuses in one table,
`frontend` runs uvicorn on the server's event loop and drains it with the gRPC server.
"""
