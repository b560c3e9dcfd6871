"""``keenlm serve MODEL``: an OpenAI-compatible HTTP server (keenlm.serve)."""
from __future__ import annotations

from keenlm.cli.options import add_model_source, model_path


def add_parser(sub, fmt):
    s = sub.add_parser("serve", help="an OpenAI-compatible server with continuous batching",
                       formatter_class=fmt)
    add_model_source(s)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port to listen on")
    s.add_argument("--quant", default="q4", choices=("none", "int8", "int4", "q4"),
                   help="weights as keenlm.load takes them (q4: the C decode engine)")
    s.add_argument("--device", default="cpu", help="cpu | cuda")
    s.add_argument("--max-batch", type=int, default=8, help="sequences decoded at once (KV slots, 1-16)")
    s.add_argument("--max-len", type=int, default=1024,
                   help="positions per slot (prompt + output); the KV pool is max-batch x max-len")
    s.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (all but /health)")
    s.add_argument("--name", default=None, help="the model id clients send (default: the file name)")
    s.add_argument("--prefill-chunk", type=int, default=128,
                   help="prompt positions prefilled per decode step while others decode")
    s.add_argument("--reward-model", default=None, metavar="DIR",
                   help="a reward model folder (keenlm train-reward) for the strategies' scorer")
    s.add_argument("--replicas", type=int, default=1,
                   help="copies of the server behind one endpoint (more than 1: Ray Serve, "
                        "pip install 'ray[serve]'; the cores are split between them)")
    return s


def run(args) -> int:
    # the serve extra (fastapi, uvicorn, sse-starlette), and Ray Serve for replicas
    from keenlm.serve.replicas import serve_replicas
    from keenlm.serve.run import serve

    options = dict(host=args.host, port=args.port, quant=args.quant, device=args.device,
                   max_batch=args.max_batch, max_len=args.max_len, max_queue=args.max_queue,
                   api_key=args.api_key, name=args.name, prefill_chunk=args.prefill_chunk,
                   reward_model=args.reward_model)
    if args.replicas == 1:
        serve(model_path(args), **options)
    else:
        serve_replicas(model_path(args), replicas=args.replicas, **options)
    return 0
