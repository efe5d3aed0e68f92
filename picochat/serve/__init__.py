"""The OpenAI-compatible server and web chat UI: `picochat serve` (cli), the app (app), the
HTTP <-> scheduler bridge (generation), request models and errors (schemas), static/index.html."""

# the server's limits: `picochat serve`'s flag defaults and create_app's (here so the CLI reads them torch-free)
MAX_BATCH = 16               # requests decoded together in the continuous batch
MAX_QUEUE = 64               # requests waiting beyond the batch before 503
MAX_BODY_BYTES = 1 << 20     # request body size limit (413 beyond)
DEFAULT_MAX_TOKENS = 512     # reply length when a request sets none (capped by the context)
