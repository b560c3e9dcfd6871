"""A helper the serving tests share (CPU and CUDA): a greedy request straight to a scheduler."""
import threading

from keenlm.serve.scheduler import Request


def greedy(sched, prompt, n_tokens, on_token=None):
    """Submit a greedy request; (its tokens, an Event set when it ends). ``on_token(k)`` runs in
    the scheduler's thread once k tokens are out."""
    out, done = [], threading.Event()

    def on(i, t, f, lp=None):
        if t is not None:
            out.append(t)
            if on_token is not None:
                on_token(len(out))
        if f is not None:
            done.set()
    sched.submit(Request(prompt=prompt, max_tokens=n_tokens, temperature=0, on_event=on))
    return out, done
