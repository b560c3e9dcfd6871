"""``keenlm serve``: an OpenAI-compatible HTTP server with continuous batching.

    scheduler.py   the continuous-batching loop: a KV-cache pool of slots, requests admitted at
                   every decode step (prefill in chunks, a slot's earlier prompt reused) and
                   retired as they finish, the C decode step for the rows
    strategies.py  test-time strategies (keenlm.infer.search) as a request option, sampling
                   through the scheduler; scored by a task's verifier or a shared reward model
    schema.py      the request bodies (pydantic) and OpenAI's error object
    app.py         the HTTP API (FastAPI, sse-starlette, prometheus-client): completions, chat,
                   models, tokenize, health, metrics, the playground page; OpenAI-shaped errors
    static/        playground.html, the page at GET /
    run.py         load a model, start the scheduler and uvicorn on 127.0.0.1, drain on SIGTERM
    replicas.py    N servers behind one endpoint as Ray Serve replicas (--replicas N)
"""
