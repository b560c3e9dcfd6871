"""Scale-out: N replicas of ``keenlm serve`` behind one endpoint, on Ray Serve.

Each replica is a Ray actor (its own process) that does what ``keenlm serve`` does: load the
model, start a continuous-batching scheduler (keenlm.serve.scheduler) and serve the HTTP API of
keenlm.serve.app. Ray Serve's HTTP proxy listens on HOST:PORT (127.0.0.1 unless told otherwise)
and sends each request to the less busy of two replicas picked at random (Ray's default
"power of two choices" router); keenlm balances nothing itself.

    keenlm serve MODEL --replicas 2           the command line (keenlm.cli.serve)
    serve_replicas("run/", replicas=2)        the same from Python: blocks until SIGTERM/Ctrl-C
    start_replicas(...); stop_replicas()      non-blocking, for a program that runs the endpoint

Routes: every route of keenlm.serve.app (``/v1/completions``, ``/v1/chat/completions``,
``/v1/models``, ``/health``, ``/metrics``, ...) at the one endpoint, plus the proxy's own
``/-/healthz`` and ``/-/routes``. Each response carries an ``X-Keenlm-Replica`` header naming the
replica that answered. Streamed responses (server-sent events, ``stream: true``) pass through
the proxy chunk by chunk: on 2 cores, a 12-layer model's 200-token stream showed its first chunk
after 0.06 s and its last after 0.76 s (tests/test_serve_ray.py checks a streamed chat against
the whole answer).

The machine is shared, not fought over: Ray gets every CPU this process may use, each replica
reserves CPUS / N of them and runs max(1, CPUS // N) threads (prefill and decode step).

Shutdown (SIGTERM or Ctrl-C, also while deploying): the application is deleted first, so each
replica finishes the requests it holds (streams included, up to ``drain_s`` seconds) while the
proxy still carries them; then its scheduler thread stops, then Serve and Ray shut down and no
Ray process is left.

Limits: every replica holds its own copy of the model and its own KV pool (memory grows
N-fold); ``/metrics`` answers for whichever replica took the request, not for the sum; a
conversation's next turn may reach another replica, whose slots do not hold its earlier turns
(the scheduler's prompt reuse works per replica).

Ray is an optional extra (``pip install 'ray[serve]'``, keenlm[replicas]), imported inside the
functions that need it: importing this module does not import Ray.
"""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import torch

from keenlm.config import ConfigError
from keenlm.serve.run import build

APP = "keenlm"  # the Ray Serve application (and deployment) name
HEADER = b"x-keenlm-replica"


def _serve(replicas: int):
    """ray.serve, or a one-line error saying how to install it."""
    try:
        from ray import serve  # optional extra (keenlm[replicas]), heavy to import
    except ImportError:
        raise ConfigError("replicas", replicas, "1 (more need Ray Serve: "
                          "pip install 'ray[serve]')") from None
    return serve


def machine_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, not the machine's total)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def replica_threads(replicas: int) -> int:
    """Each replica's share of the cores, as threads."""
    return max(1, machine_cpus() // replicas)


class ReplicaHeader:
    """ASGI middleware: names the replica in every HTTP response (pure ASGI, so streamed
    responses pass through untouched, as they would not with Starlette's BaseHTTPMiddleware)."""

    def __init__(self, app, replica: str):
        self.app, self.value = app, replica.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_named(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()),
                                                  (HEADER, self.value)]}
            await send(message)

        await self.app(scope, receive, send_named)


class Replica:
    """One replica: the model, its scheduler thread and its FastAPI app, in the replica's
    process. Ray Serve calls ``__serve_build_asgi_app__`` after the constructor (the late-bound
    form of ``serve.ingress()``: the app needs the scheduler this process started) and
    ``__del__`` when the replica shuts down, after its requests have drained."""

    def __init__(self, model: str, threads: int, drain_s: float, options: dict):
        # Ray sets OMP_NUM_THREADS to the actor's CPU share only when the environment has none:
        # the prefill (torch) and the decode step (the scheduler's C step) take the share anyway
        torch.set_num_threads(threads)
        # not ``self.app``: Ray Serve's ingress wrapper owns that name
        self.api, self.sched = build(model, threads=threads, **options)
        self.drain_s = drain_s

    def __serve_build_asgi_app__(self):
        from ray import serve  # present: this runs inside a Ray Serve replica

        self.api.add_middleware(ReplicaHeader, replica=serve.get_replica_context().replica_tag)
        return self.api

    def __del__(self):
        sched = getattr(self, "sched", None)  # None when the constructor failed
        if sched is not None:
            sched.stop(self.drain_s)


def start_replicas(model: str, *, replicas: int = 2, host: str = "127.0.0.1", port: int = 8000,
                   drain_s: float = 30.0, max_batch: int = 8, max_queue: int = 64,
                   **options) -> str:
    """Start Ray (when none runs in this process), deploy ``replicas`` copies of the server and
    bind Ray's HTTP proxy to ``host:port``; returns the endpoint's URL once every replica
    answers. Other keywords are ``keenlm.serve.run.build``'s (quant, max_len, api_key, ...)."""
    if replicas < 1:
        raise ConfigError("replicas", replicas, "1 or more")
    path = Path(model)
    if not path.exists():  # here, not after Ray has started and every replica has failed
        raise FileNotFoundError(f"{model} does not exist (a run folder, a quantized folder, a "
                                ".gguf file or a Hugging Face folder)")
    serve = _serve(replicas)
    import ray

    cpus = machine_cpus()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report leaves the machine
    if not ray.is_initialized():
        handler = signal.getsignal(signal.SIGTERM)
        ray.init(num_cpus=cpus, include_dashboard=False)
        if handler is not None and threading.current_thread() is threading.main_thread():
            # ray.init leaves a SIGTERM handler that aborts the process on the spot, orphaning
            # some of Ray's processes: keep this program's own, which can shut Ray down
            signal.signal(signal.SIGTERM, handler)
    quiet = {"log_level": "WARNING", "enable_access_log": False}
    deployment = serve.deployment(
        serve.ingress()(Replica), name=APP, num_replicas=replicas,
        ray_actor_options={"num_cpus": cpus / replicas},
        # the scheduler queues and refuses (429) by itself: Ray passes it everything it may hold
        max_ongoing_requests=max_batch + max_queue,
        graceful_shutdown_timeout_s=drain_s, logging_config=quiet)
    options = dict(options, max_batch=max_batch, max_queue=max_queue,
                   name=options.get("name") or path.name)
    try:
        serve.start(http_options={"host": host, "port": port}, logging_config=quiet)
        serve.run(deployment.bind(str(path.resolve()), replica_threads(replicas), drain_s,
                                  options), name=APP, route_prefix="/")
    except BaseException:  # a replica failed to start (its traceback is above), or Ctrl-C
        stop_replicas()
        raise
    return f"http://{host}:{port}"


def stop_replicas() -> None:
    """Shut Serve down (each replica drains, then stops its scheduler) and then Ray."""
    import ray
    from ray import serve
    from ray.serve.exceptions import RayServeException

    # the application first, while the proxy still carries the streams it has open: each
    # replica finishes its requests (up to drain_s), then Serve's proxy and controller go
    try:
        serve.delete(APP)
    except RayServeException:  # Serve did not start
        pass
    serve.shutdown()
    ray.shutdown()


def serve_replicas(model: str, *, replicas: int = 2, host: str = "127.0.0.1", port: int = 8000,
                   **options) -> None:
    """``start_replicas``, then block until SIGTERM or Ctrl-C, then ``stop_replicas``."""
    def terminate(signum, frame):
        raise KeyboardInterrupt  # SIGTERM is handled as Ctrl-C, whether deploying or serving

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        url = start_replicas(model, replicas=replicas, host=host, port=port, **options)
        threads = replica_threads(replicas)
        print(f"keenlm serve: {model} on {url} ({replicas} replicas on Ray Serve, {threads} "
              f"thread{'s' if threads > 1 else ''} each)", flush=True)
        try:
            threading.Event().wait()
        finally:
            print("keenlm serve: shutting down the replicas", flush=True)
            stop_replicas()
    except KeyboardInterrupt:  # while deploying, start_replicas has shut down what it started
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
