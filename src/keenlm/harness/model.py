"""lm-evaluation-harness' model interface over a keenlm model: ``lm_eval --model keenlm
--model_args pretrained=PATH[,quant=q4,batch_size=8,max_length=N]``, or
``KeenLM(model=keenlm.load(...))`` from Python.

Scoring follows the harness' own API models (``TemplateLM``): a context and continuation are
encoded whole and split where the context's ids end; an empty context is conditioned on the
beginning-of-text token (the end-of-text one without it); a rolling log-likelihood scores
disjoint windows of ``max_length`` tokens.
Tokenization is the one ``keenlm serve`` applies to a text prompt (``encode_prompt``: special
tokens written in the text are read as their ids), so this class and the harness'
``local-completions`` client against ``keenlm serve`` see the same ids and give the same
figures.

``generate_until`` decodes greedily (or samples, when the task asks for ``do_sample``) with
keenlm's generation loop, the C decode step for q4 models; ``batch_size`` rows at a time. Rows
of one batch are left-padded, which can change a near-tie of the argmax against a row decoded
alone; ``batch_size=1`` decodes each request exactly as the server does.
"""
from __future__ import annotations

from typing import Optional

import lm_eval.models  # noqa: F401  (the harness fills its registry only while it is empty)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from keenlm.api import load
from keenlm.config import GenerateConfig
from keenlm.infer.generate import generate_tokens, left_pad, stop_check
from keenlm.model.attention import SharedPrefix


def _cut(text: str, until) -> str:
    cuts = [text.find(s) for s in until if s and s in text]
    return text[:min(cuts)] if cuts else text


@register_model("keenlm")
class KeenLM(TemplateLM):
    def __init__(self, pretrained: Optional[str] = None, quant: str = "none", device: str = "cpu",
                 batch_size: int | str = 8, max_length: Optional[int] = None,
                 max_gen_toks: int = 256, model=None, **unused):
        super().__init__()
        if unused:
            raise ValueError(f"keenlm model: unknown arguments {sorted(unused)} (known: "
                             "pretrained, quant, device, batch_size, max_length, max_gen_toks)")
        if model is None:
            if pretrained is None:
                raise ValueError("keenlm model: give pretrained=PATH (run folder, quantized "
                                 "folder, GGUF file or Hugging Face folder)")
            model = load(pretrained, device=device, quant=quant)
        self.net, self.tok = model.net.eval(), model.tokenizer
        self._device = next(self.net.parameters()).device
        self.batch = int(batch_size) if str(batch_size) != "auto" else 8
        cap = self.net.cfg.max_seq_len
        self.max_length = min(int(max_length), cap) if max_length else cap
        self.max_gen_toks = int(max_gen_toks)

    # ------------------------------------------------------------------ tokens
    @property
    def eot_token_id(self) -> int:
        if self.tok.eos_id is None:
            raise ValueError("this model's tokenizer has no end-of-text token to condition an "
                             "empty context on")
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is conditioned on: the beginning-of-text token where the
        tokenizer has one, else the end-of-text token (as the harness' hf backend does)."""
        bos = getattr(self.tok, "bos_token", None)
        return self.tok.token_to_id(bos) if bos else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.tok.encode_prompt(string)

    def tok_decode(self, ids) -> str:
        return self.tok.decode(ids)

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def _score(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Log-probability of each continuation given its context, and whether greedy decoding
        would produce it; one forward pass per row batch (right-padded: causal attention keeps
        the padding out of every real position)."""
        inputs = []
        for ctx, cont in rows:
            if not cont:
                raise ValueError("an empty continuation cannot be scored")
            # the whole sequence goes in, its last token too (its logits are not used): the
            # forward pass a server runs on the same ids, so both round alike
            inputs.append(((ctx + cont)[-self.max_length:], len(cont)))
        width = max(len(x) for x, _ in inputs)
        idx = torch.zeros(len(inputs), width, dtype=torch.long, device=self._device)
        for i, (x, _) in enumerate(inputs):
            idx[i, :len(x)] = torch.tensor(x)
        if type(self.net.lm_head) is torch.nn.Linear:
            # the LM head only where a continuation token is predicted: the context's positions
            # need no logits (the head is a fifth of SmolLM2's weights, its softmax 49152 wide)
            h = self.net(idx, hidden=True)
            picked = [h[i, len(x) - 1 - n:len(x) - 1] for i, (x, n) in enumerate(inputs)]
            logps = torch.log_softmax(self.net.lm_head(torch.cat(picked)).float(), dim=-1)
        else:  # a quantized head rounds by its row count: all positions, as a server computes
            logits = self.net(idx).float()
            logps = torch.log_softmax(torch.cat([logits[i, len(x) - 1 - n:len(x) - 1]
                                                 for i, (x, n) in enumerate(inputs)]), dim=-1)
        out, at = [], 0
        for (x, n), (_, cont) in zip(inputs, rows):
            lp = logps[at:at + n]
            at += n
            target = torch.tensor(cont, device=self._device)
            out.append((float(lp.gather(1, target[:, None]).sum()),
                        bool((lp.argmax(-1) == target).all())))
        return out

    @torch.no_grad()
    def _score_shared(self, items: list[tuple[list[int], list[list[int]]]]
                      ) -> list[list[tuple[float, bool]]]:
        """``_score`` for multiple-choice items, (context, continuations) each: every context
        runs once (left-padded, all items in one pass) and every continuation attends to its
        context's keys and values (``SharedPrefix``; a second pass), instead of the context
        again in every row. The same numbers as ``_score`` up to float rounding
        (tests/test_harness.py compares them)."""
        dev = self._device
        idx, key_mask = left_pad([ctx[:-1] for ctx, _ in items], dev)
        positions = (key_mask.long().cumsum(-1) - 1).clamp_min(0)
        rows = [(g, ctx[-1], c) for g, (ctx, conts) in enumerate(items) for c in conts]
        cache = SharedPrefix(torch.tensor([g for g, _, _ in rows], device=dev))
        self.net.hidden_states(idx, cache=cache, positions=positions, key_mask=key_mask)
        width = max(len(c) for _, _, c in rows)
        comp = torch.zeros(len(rows), width, dtype=torch.long, device=dev)
        for r, (_, last, c) in enumerate(rows):  # the context's last token, then c but its last
            comp[r, :len(c)] = torch.tensor([last] + c[:-1])
        prefix = cache.rows
        pos = positions[:, -1][prefix][:, None] + 1 + torch.arange(width, device=dev)
        keys = torch.cat([key_mask[prefix], torch.ones(len(rows), width, dtype=torch.bool,
                                                        device=dev)], dim=1)
        h = self.net.hidden_states(comp, cache=cache, positions=pos, key_mask=keys)
        logps = torch.log_softmax(self.net.lm_head(
            torch.cat([h[r, :len(c)] for r, (_, _, c) in enumerate(rows)])).float(), dim=-1)
        out: list[list[tuple[float, bool]]] = [[] for _ in items]
        at = 0
        for g, _, c in rows:
            lp, target = logps[at:at + len(c)], torch.tensor(c, device=dev)
            at += len(c)
            out[g].append((float(lp.gather(1, target[:, None]).sum()),
                           bool((lp.argmax(-1) == target).all())))
        return out

    def _shares_prefixes(self) -> bool:
        """Whether contexts can be shared: a full-precision head (a quantized one rounds by its
        row count, so rows are scored as a server scores them) and keys and values that carry
        all the state (model.memory's layers carry more)."""
        return (type(self.net.lm_head) is torch.nn.Linear
                and self.net.cfg.memory.kind == "none")

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        results: list = [None] * len(requests)
        if self._shares_prefixes():
            groups: dict[tuple, list[int]] = {}
            for i, (_, ctx, cont) in enumerate(requests):
                if len(ctx) >= 2 and cont and len(ctx) + len(cont) <= self.max_length:
                    groups.setdefault(tuple(ctx), []).append(i)
            shared = sorted((m for m in groups.values() if len(m) > 1),
                            key=lambda m: -len(requests[m[0]][1]))  # similar lengths together
            for start in range(0, len(shared), self.batch):  # batch_size items per pass
                chunk = shared[start:start + self.batch]
                scored = self._score_shared([(requests[m[0]][1], [requests[i][2] for i in m])
                                             for m in chunk])
                for members, item in zip(chunk, scored):
                    for i, r in zip(members, item):
                        results[i] = r
                        if requests[i][0] is not None:
                            self.cache_hook.add_partial("loglikelihood", requests[i][0], r)
        order = sorted((i for i in range(len(requests)) if results[i] is None),
                       key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        for start in range(0, len(order), self.batch):
            chunk = order[start:start + self.batch]
            scored = self._score([(requests[i][1], requests[i][2]) for i in chunk])
            for i, r in zip(chunk, scored):
                results[i] = r
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], r)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (string,) in [r.args for r in requests]:
            windows = [(None,) + make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length - 1, context_len=1)]
            total = sum(lp for lp, _ in self._loglikelihood_tokens(windows))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results: list = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):  # one generation setting per batch
            groups.setdefault(repr(sorted(r.args[1].items())), []).append(i)
        for members in groups.values():
            kwargs = dict(requests[members[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [u for u in ([until] if isinstance(until, str) else until) if u]
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0)) if sample else 0.0
            cfg = GenerateConfig(max_new_tokens=max_new, temperature=temperature,
                                 top_p=float(kwargs.pop("top_p", 1.0)), top_k=0,
                                 seed=int(kwargs.pop("seed", 0)), stop=tuple(until))
            room = self.max_length - max_new
            if room < 1:
                raise ValueError(f"max_gen_toks {max_new} leaves no room for a prompt in "
                                 f"{self.max_length} positions")
            for start in range(0, len(members), self.batch):
                chunk = members[start:start + self.batch]
                prompts = [self.tok_encode(requests[i].args[0])[-room:] for i in chunk]
                outs = generate_tokens(self.net, prompts, cfg, eos_id=self.tok.eos_id,
                                       should_stop=stop_check(self.tok, until))
                for i, o in zip(chunk, outs):
                    text = _cut(self.tok.decode(o), until)
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results


def run_harness(model, tasks, *, limit=None, batch_size: int = 8, max_length=None,
                log_samples: bool = False) -> dict:
    """lm-evaluation-harness' ``simple_evaluate`` on a loaded keenlm model (``keenlm.load``) with
    keenlm's local tasks on the include path; its result dict."""
    import os

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from keenlm.harness import TASK_NAMES, TASKS

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local tasks only: never a download
    lm = KeenLM(model=model, batch_size=batch_size, max_length=max_length)
    # the harness' own task index (thousands of YAML files, ~13 s here) only when a task needs it
    defaults = not set(tasks) <= set(TASK_NAMES)
    return simple_evaluate(model=lm, tasks=list(tasks), limit=limit, log_samples=log_samples,
                           task_manager=TaskManager(include_path=str(TASKS),
                                                    include_defaults=defaults))


def summary(results: dict) -> dict[str, dict[str, float]]:
    """task -> {metric: value} of a harness result, without the standard errors."""
    return {task: {k.split(",")[0]: v for k, v in r.items()
                   if "," in k and "stderr" not in k and isinstance(v, (int, float))}
            for task, r in results["results"].items()}
