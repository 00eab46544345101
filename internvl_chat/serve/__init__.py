"""`internvl-chat serve`: the local engine behind an OpenAI-compatible HTTP API.

One model, one engine thread. Requests are turned into prompt ids exactly as the terminal app's
Session builds them, and a few KV-cache slots keep recent conversations so a resent history only
prefills its new tokens. Modules: `main` (flags → running server), `connections` (uvicorn's h11
protocol with head, body and write deadlines; the connection limit), `app` (routes), `cors` (the
CORS headers of answers made outside the middleware), `replies` (a queued job's events as the
routes read them), `text_completions` (the legacy /v1/completions), `tokenizer_api` (vLLM's
/tokenize, /detokenize, /tokenizer_info), `protocol`
(request/response shapes), `conversation` (request → prompt ids), `media` (data:/remote/local
media), `features` (image-feature LRU), `answers` (our replies' exact ids), `slots` (KV slots),
`namespaces` (cache_salt: whose cached state a request may reuse),
`engine` (the worker thread and its queue), `stops` (stop strings), `logprobs` (OpenAI's
logprobs of an answer), `sse`, `errors`, `options`.
"""
