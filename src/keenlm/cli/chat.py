"""``keenlm chat MODEL``: a multi-turn conversation in the terminal.

Each turn renders the whole conversation with the model's chat template (sandboxed Jinja2),
generates the reply with streaming, and stops at the end-of-turn token. Ctrl-C while the model
is answering stops that answer and keeps the conversation; Ctrl-C (or Ctrl-D) at the prompt
leaves. The conversation is cut from the oldest turns when it would outgrow the context.
"""
from __future__ import annotations

import sys

import keenlm
from keenlm.cli.options import add_device_options


def add_parser(sub, fmt):
    ch = sub.add_parser("chat", help="multi-turn chat with a model that has a chat template",
                        formatter_class=fmt)
    ch.add_argument("model", help="run folder, .gguf file or Hugging Face folder")
    ch.add_argument("--system", default=None, help="system message")
    ch.add_argument("--max-new-tokens", type=int, default=256, help="tokens per reply")
    ch.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    add_device_options(ch)
    return ch


def run(args) -> int:
    chat_loop(args.model, system=args.system, max_new_tokens=args.max_new_tokens,
              temperature=args.temperature, device=args.device, quant=args.quant)
    return 0


def chat_loop(model_path, *, system=None, max_new_tokens=256, temperature=0.7, device="cpu",
              quant="none", read=input, write=None):
    write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    km = keenlm.load(model_path, device=device, quant=quant)
    if not km.tokenizer.chat_template:
        raise ValueError(f"{model_path}: the model has no chat template; use keenlm generate")
    messages = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            user = read("> ")
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return messages
        if not user.strip():
            continue
        messages.append({"role": "user", "content": user})
        reply = _answer(km, messages, max_new_tokens, temperature, write)
        messages.append({"role": "assistant", "content": reply})


def _answer(km, messages, max_new_tokens, temperature, write) -> str:
    limit = km.net.cfg.max_seq_len - max_new_tokens
    while True:  # drop the oldest exchanges until the prompt fits
        prompt = km.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        first = 1 if messages[0]["role"] == "system" else 0
        if len(km.tokenizer.encode_prompt(prompt)) <= limit or len(messages) - first <= 1:
            break
        del messages[first:first + 2]
    parts: list[str] = []

    def sink(text):
        parts.append(text)
        write(text)

    try:
        km.generate(prompt, stream=sink, max_new_tokens=max_new_tokens, temperature=temperature)
    except KeyboardInterrupt:
        write(" [stopped]")
    write("\n")
    return "".join(parts)
