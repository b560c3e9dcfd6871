"""Autoregressive generation: batched, left-padded, KV-cached, streamed.

One prefill pass runs every prompt through the model at once (rows left-padded to the longest
prompt; padded keys masked out; rotary positions counted per row so padding never shifts a
prompt), filling a preallocated KV cache. Then each decode step feeds one token per row and
reads the cache. Rows that finish (end-of-text token or a stop string) stop growing.

Sampling, in order: repetition penalty (CTRL, Keskar et al. 2019: positive logits of tokens
already present are divided by the penalty, negative ones multiplied), temperature (0 =
greedy), top-k, top-p (nucleus, Holtzman et al. 2019).

Legend: B rows, L longest prompt, V vocab.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from keenlm.config import GenerateConfig
from keenlm.infer.engine import decode_engine
from keenlm.quant.q4 import decode_threads


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (B, V); seen (B, V) bool marks tokens already in each row."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest top-p nucleus."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p (the first always stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, seen: torch.Tensor, cfg: GenerateConfig,
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """logits (B, V) fp32 -> next token ids (B,)."""
    logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_top_k_top_p(logits / cfg.temperature, cfg.top_k, cfg.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def left_pad(prompts: Sequence[Sequence[int]], device):
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt must have at least one token")
    L = max(len(p) for p in prompts)
    idx = torch.zeros(len(prompts), L, dtype=torch.long)
    mask = torch.zeros(len(prompts), L, dtype=torch.bool)
    for i, p in enumerate(prompts):
        idx[i, L - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, L - len(p):] = True
    return idx.to(device), mask.to(device)


def _check_fits(mcfg, idx, max_new_tokens: int) -> None:
    """Prompt ids inside the vocabulary, prompt + new tokens inside the context."""
    if int(idx.max()) >= mcfg.vocab_size:
        raise ValueError(f"prompt token id {int(idx.max())} is outside the vocabulary "
                         f"({mcfg.vocab_size})")
    if idx.shape[1] + max_new_tokens > mcfg.max_seq_len:
        raise ValueError(f"prompt of {idx.shape[1]} tokens + generate.max_new_tokens "
                         f"{max_new_tokens} exceeds model.max_seq_len {mcfg.max_seq_len}")


def _take(tokens: list[int], out, done, eos_id, should_stop, on_token) -> None:
    """Append one sampled token to every row still running; a row ends at eos or its stop."""
    for r, t in enumerate(tokens):
        if done[r]:
            continue
        if eos_id is not None and t == eos_id:
            done[r] = True
            continue
        out[r].append(t)
        if on_token is not None:
            on_token(r, t)
        if should_stop is not None and should_stop(r, out[r]):
            done[r] = True


@torch.no_grad()
def generate_tokens(model, prompts: Sequence[Sequence[int]], cfg: GenerateConfig = GenerateConfig(),
                    *, eos_id: Optional[int] = None,
                    should_stop: Optional[Callable[[int, list[int]], bool]] = None,
                    on_token: Optional[Callable[[int, int], None]] = None,
                    repeat: int = 1, seeds: Optional[Sequence[int]] = None) -> list[list[int]]:
    """Generate continuations of token-id prompts; returns the new ids of each row.

    should_stop(row, new_ids) -> True ends that row (stop strings); on_token(row, id) streams.
    repeat: each prompt fills ``repeat`` consecutive rows (several samples of one prompt, as
    GRPO draws them): its prefill runs once and the rows share a copy of its KV cache.
    seeds: one sampling seed per prompt (instead of ``cfg.seed`` for the batch): a prompt's
    samples then do not depend on the other prompts of the batch, so prompts split over
    processes sample what one process would.
    """
    if repeat < 1:
        raise ValueError(f"repeat {repeat}: an integer >= 1")
    device = next(model.parameters()).device
    idx, key_mask = left_pad(prompts, device)
    _check_fits(model.cfg, idx, cfg.max_new_tokens)
    P, L = idx.shape
    B = P * repeat
    vocab = model.cfg.vocab_size
    total = L + cfg.max_new_tokens
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.temperature > 0 else None
    gens = None
    if seeds is not None and cfg.temperature > 0:
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        gens = [torch.Generator(device=device).manual_seed(int(x)) for x in seeds]
    positions = (key_mask.long().cumsum(-1) - 1).clamp_min(0)
    cache = model.new_cache(P, total)
    logits = model(idx, cache=cache, positions=positions, key_mask=key_mask, last_only=True)[:, -1]
    if repeat > 1:
        cache.repeat_rows(repeat)
        idx, key_mask, positions, logits = (t.repeat_interleave(repeat, dim=0)
                                            for t in (idx, key_mask, positions, logits))
    seen = torch.zeros(B, vocab, dtype=torch.bool, device=device)
    seen.scatter_(1, idx, key_mask)
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    next_pos = positions[:, -1:] + 1
    # the key mask for every step, allocated once: the prompt's padding, then all-visible
    full_mask = torch.ones(B, total, dtype=torch.bool, device=device)
    full_mask[:, :L] = key_mask
    track_seen = cfg.repetition_penalty != 1.0
    # a q4 model decodes in one C call per token (keenlm.infer.engine) where it can
    engine, threads = decode_engine(model, B), torch.get_num_threads()
    try:
        with decode_threads(model):  # the q4 path's kernels take the threads while decoding
            for _ in range(cfg.max_new_tokens):
                if gens is None:
                    tok = sample_next(logits.float(), seen, cfg, gen)
                else:  # each prompt's rows from its own generator
                    tok = torch.cat([sample_next(logits[i * repeat:(i + 1) * repeat].float(),
                                                 seen[i * repeat:(i + 1) * repeat], cfg, g)
                                     for i, g in enumerate(gens)])
                _take(tok.tolist(), out, done, eos_id, should_stop, on_token)
                if all(done):
                    break
                if track_seen:
                    seen[torch.arange(B, device=device), tok] = True
                if engine is not None:
                    logits = engine.step(tok, next_pos[:, 0], cache, full_mask, threads)
                else:
                    logits = model(tok[:, None], cache=cache, positions=next_pos,
                                   key_mask=full_mask[:, :cache.length + 1])[:, -1]
                next_pos = next_pos + 1
    finally:
        model.train(was_training)
    return out


class _TextStream:
    """Streams row 0's text, holding back a partly decoded UTF-8 character."""

    def __init__(self, tokenizer, sink: Callable[[str], None]):
        self.tokenizer, self.sink, self.ids, self.printed = tokenizer, sink, [], 0

    def __call__(self, row: int, tok: int) -> None:
        if row != 0:
            return
        self.ids.append(tok)
        text = self.tokenizer.decode(self.ids).rstrip("\ufffd")
        if len(text) > self.printed:
            self.sink(text[self.printed:])
            self.printed = len(text)


def _cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cuts = [text.find(s) for s in stop if s in text]
    return text[:min(cuts)] if cuts else text


def stop_check(tokenizer, stop: Sequence[str]) -> Optional[Callable[[int, list[int]], bool]]:
    """A ``should_stop`` for generate_tokens: True once a row's text holds a stop string
    (stop strings are short: decoding the tail of the row suffices); None without stops."""
    if not stop:
        return None
    return lambda row, new_ids: any(s in tokenizer.decode(new_ids[-64:]) for s in stop)


def generate(model, tokenizer, prompts: str | Sequence[str], cfg: GenerateConfig = GenerateConfig(),
             *, stream: Optional[Callable[[str], None]] = None, repeat: int = 1) -> str | list[str]:
    """Text in, text out (stop strings cut off). ``stream`` receives row 0's text as it comes.
    ``repeat``: that many samples of each prompt, in consecutive rows, each prompt prefilled once."""
    single = isinstance(prompts, str)
    if single and repeat != 1:
        raise ValueError("repeat > 1 returns several texts: pass a list of prompts")
    texts = [prompts] if single else list(prompts)
    ids = [tokenizer.encode_prompt(t) for t in texts]
    outs = generate_tokens(model, ids, cfg, eos_id=tokenizer.eos_id,
                           should_stop=stop_check(tokenizer, cfg.stop),
                           on_token=_TextStream(tokenizer, stream) if stream else None,
                           repeat=repeat)
    results = [_cut_at_stop(tokenizer.decode(o), cfg.stop) for o in outs]
    return results[0] if single else results
