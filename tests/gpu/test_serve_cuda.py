"""keenlm serve on a CUDA GPU: the PyTorch model decodes each sequence in its slot of a KV pool on
the GPU; continuous batching changes no greedy token, and the HTTP API streams.

Opt-in by nature: skipped where torch sees no CUDA device. Run on a GPU machine with:
PYTHONPATH=src python -m pytest -q tests/gpu
"""
import json
import threading

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="no CUDA device")]
pytest.importorskip("fastapi", reason="the serve extra is not installed")
httpx = pytest.importorskip("httpx")

from keenlm.config import ModelConfig  # noqa: E402
from keenlm.data import ByteTokenizer  # noqa: E402
from keenlm.model import build_model  # noqa: E402
from keenlm.serve.app import create_app  # noqa: E402
from keenlm.serve.scheduler import Scheduler  # noqa: E402
from serve_helpers import greedy  # noqa: E402


def tiny_cuda():
    torch.manual_seed(0)
    net = build_model(ModelConfig(vocab_size=257, n_layer=2, d_model=128, n_head=4, n_kv_head=2,
                                  d_ff=256, max_seq_len=256)).cuda().eval()
    tok = ByteTokenizer()
    tok.eos_id = None
    return net, tok


def test_batching_on_cuda_changes_no_token():
    net, tok = tiny_cuda()
    sched = Scheduler(net, tok, max_batch=4, max_len=256, prefill_chunk=8).start()
    try:
        assert sched.engine is None and sched.k.is_cuda
        prompts = [list(b"def f(x):"), list(b"import os, sys\n"), list(b"class A:\n    pass")]
        alone = []
        for p in prompts:
            out, d = greedy(sched, p, 24)
            assert d.wait(60)
            alone.append(out)
        runs = [greedy(sched, p, 24) for p in prompts]  # all three decode together
        assert all(d.wait(60) for _, d in runs)
        assert [o for o, _ in runs] == alone
    finally:
        sched.stop()


def test_the_api_streams_from_the_gpu():
    import uvicorn

    net, tok = tiny_cuda()
    sched = Scheduler(net, tok, max_batch=4, max_len=256).start()
    server = uvicorn.Server(uvicorn.Config(create_app(sched, "tiny"), host="127.0.0.1", port=0,
                                           log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            pass
        url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        body = {"model": "tiny", "prompt": "def add(a, b):", "max_tokens": 16, "temperature": 0}
        whole = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
        pieces = []
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True},
                          timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    pieces.append(json.loads(line[6:])["choices"][0]["text"])
        assert "".join(pieces) == whole["choices"][0]["text"] and len(pieces) > 1
    finally:
        server.should_exit = True
        thread.join(10)
        sched.stop()
