"""Chat templates from files (GGUF metadata, ``tokenizer_config.json``): Jinja2 in a sandbox.

A chat template is code that arrives with a downloaded model. It runs in Jinja2's
``ImmutableSandboxedEnvironment`` (no attribute that starts with ``_``, no mutation of
lists or dicts, ``range`` bounded), tightened three ways:

- an unsafe attribute, and any attribute or key starting with ``_`` (existing or not), is an
  error at once (``SecurityError``): plain Jinja returns an undefined value that prints
  nothing, so ``{{ ''.__class__ }}`` would render quietly;
- repetition and powers are bounded (``'a' * 10**9``, ``[0] * 10**9``, ``9 ** 99999999`` are
  errors, not a machine out of memory or a CPU spinning);
- its only globals are Jinja's own (``range``, ``dict``, ``lipsum``, ``cycler``, ``joiner``,
  ``namespace``, whose internals the first rule closes) and ``raise_exception``.

``vet`` is what a loader calls: it parses the template and refuses one that names an attribute
or key starting with ``_`` anywhere (taken branch or not), or that fails a trial render of a
one-message conversation with a security error; a refused template is dropped and the model
loads without one (the reason printed). ``render`` is what ``apply_chat_template`` runs; any
template error comes out as one ``ValueError`` naming the template's source.
"""
from __future__ import annotations

import functools
import sys

MAX_ITEMS = 1_000_000  # the longest string or list a template may build by repetition
MAX_POWER = 1_000  # the largest exponent


@functools.lru_cache(maxsize=1)
def _environment():
    """The sandbox (built once: rendering a task's prompts renders the template thousands of
    times)."""
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # optional extra: keenlm[io]

    class Sandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})

        def getattr(self, obj, attribute):
            if isinstance(attribute, str) and attribute.startswith("_"):  # existing or not
                raise SecurityError(f"access to attribute {attribute!r} is not allowed")
            return super().getattr(obj, attribute)

        def getitem(self, obj, argument):
            if isinstance(argument, str) and argument.startswith("_"):
                raise SecurityError(f"access to key {argument!r} is not allowed")
            return super().getitem(obj, argument)

        def unsafe_undefined(self, obj, attribute):
            raise SecurityError(f"access to attribute {attribute!r} of a "
                                f"{type(obj).__name__} object is not allowed")

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > MAX_POWER:
                raise SecurityError(f"a power of {right} (at most {MAX_POWER})")
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) \
                            and len(seq) * n > MAX_ITEMS:
                        raise SecurityError(f"a repetition to {len(seq) * n} items (at most "
                                            f"{MAX_ITEMS})")
            return super().call_binop(context, operator, left, right)

    env = Sandbox(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(msg):
        raise ValueError(f"chat template: {msg}")

    env.globals["raise_exception"] = raise_exception
    return env


def _private_names(template: str) -> list[str]:
    """Attributes and constant keys starting with ``_`` anywhere in the template's syntax."""
    from jinja2 import nodes

    found = []
    for node in _environment().parse(template).find_all((nodes.Getattr, nodes.Getitem)):
        name = node.attr if isinstance(node, nodes.Getattr) else (
            node.arg.value if isinstance(node.arg, nodes.Const) else None)
        if isinstance(name, str) and name.startswith("_"):
            found.append(name)
    return found


@functools.lru_cache(maxsize=16)
def _compiled(template: str):
    return _environment().from_string(template)


def render(template: str, messages: list[dict], *, add_generation_prompt: bool = True,
           bos_token: str = "", eos_token: str = "", source: str = "") -> str:
    """The conversation rendered by ``template`` in the sandbox; ValueError on any error."""
    from jinja2.exceptions import TemplateError

    try:
        return _compiled(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=bos_token, eos_token=eos_token)
    except (TemplateError, OverflowError, MemoryError, RecursionError) as e:
        where = f" of {source}" if source else ""
        raise ValueError(f"chat template{where} refused: {type(e).__name__}: {e}") from None


def refusal(template: str, bos_token: str = "", eos_token: str = "") -> str | None:
    """Why ``template`` is refused (see the module docstring), or None when it is allowed."""
    from jinja2.exceptions import SecurityError, TemplateSyntaxError

    try:
        private = _private_names(template)
    except TemplateSyntaxError as e:
        return f"not valid Jinja: {e}"
    if private:
        return f"it reaches for private attributes ({', '.join(sorted(set(private)))})"
    try:
        _compiled(template).render(
            messages=[{"role": "user", "content": "Hello"}], add_generation_prompt=True,
            bos_token=bos_token, eos_token=eos_token)
    except SecurityError as e:
        return f"a trial render broke the sandbox's rules ({e})"
    except Exception:  # noqa: BLE001 - other errors surface when the template is used
        pass
    return None


def vet(template: str | None, source: str = "", bos_token: str = "",
        eos_token: str = "") -> str | None:
    """The template, or None (said in one line on stderr) when it is refused."""
    if not template:
        return None
    why = refusal(template, bos_token or "", eos_token or "")
    if why is None:
        return template
    print(f"keenlm: the chat template of {source or 'this model'} is refused: {why}; the model "
          "loads without one", file=sys.stderr)
    return None
