"""Server defaults the CLI shows in ``--help``, kept apart so that the CLI imports no web stack."""

DEFAULT_HEADER_TIMEOUT_S = 10.0  # a request's complete headers, in total
DEFAULT_MAX_CONNECTIONS = 512  # per port; beyond it uvicorn answers 503 to new requests
