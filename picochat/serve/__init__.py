"""The OpenAI-compatible server and web chat UI: `picochat serve` (cli), the app (app), the
HTTP <-> scheduler bridge (generation), request models and errors (schemas), static/index.html."""
