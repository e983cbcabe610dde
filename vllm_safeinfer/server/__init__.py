"""What runs in the process that accepts requests: the API server of `safeinfer serve`
(its command line, HTTP endpoints and per-mode metrics) and the frontend hooks that
validate every request, also in the process of an offline `LLM(...)`."""
