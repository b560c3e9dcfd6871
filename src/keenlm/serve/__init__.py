"""``keenlm serve``: an OpenAI-compatible HTTP server with continuous batching.

    scheduler.py   the continuous-batching loop: a KV-cache pool of slots, requests admitted at
                   every decode step and retired as they finish, the C decode step for the rows
    strategies.py  test-time strategies (keenlm.infer.search) as a request option, sampling
                   through the scheduler
    app.py         the HTTP API (FastAPI, sse-starlette, prometheus-client): completions, chat,
                   models, tokenize, health, metrics; OpenAI-shaped errors
    run.py         load a model, start the scheduler and uvicorn on 127.0.0.1, drain on SIGTERM
"""
