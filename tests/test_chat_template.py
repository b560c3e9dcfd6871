"""Chat templates from files run in a tightened Jinja2 sandbox (keenlm.data.chat_template):
known server-side template-injection payloads are refused with a clear error, at load and at
render, and a GGUF file whose template carries one loads with the template dropped."""
import contextlib

import pytest
import torch

pytest.importorskip("jinja2")

from keenlm.data import chat_template as templates  # noqa: E402
from keenlm.data import train_bpe  # noqa: E402

OK = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
      "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

PAYLOADS = {  # attribute walks to Python internals, through every global Jinja offers
    "class_mro_subclasses": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "class_alone": "{{ ''.__class__ }}",
    "cycler_globals_os": "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "joiner_globals": "{{ joiner.__init__.__globals__ }}",
    "namespace_globals": "{{ namespace.__init__.__globals__['os'] }}",
    "lipsum_globals": "{{ lipsum.__globals__['os'].popen('id').read() }}",
    "range_globals": "{{ range.__self__ }}",
    "self_context": "{{ self._TemplateReference__context }}",
    "subscript_dunder": "{{ messages['__class__'] }}",
    "attr_filter": "{{ messages|attr('__class__') }}",
    "dict_builtin_walk": "{{ dict.__base__.__subclasses__() }}",
    "format_dunder": "{{ '{0.__class__}'.format(messages) }}",
    "in_untaken_branch": "{% if false %}{{ cycler.__init__.__globals__ }}{% endif %}" + OK,
    "huge_string": "{{ 'a' * 10**9 }}",
    "huge_list": "{{ [0] * 10**9 }}",
    "huge_power": "{{ 9 ** 99999999 }}",
}


def test_an_ordinary_template_renders():
    text = templates.render(OK, [{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert templates.refusal(OK) is None


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_injection_payloads_are_refused(name):
    payload = PAYLOADS[name]
    # (a payload in a branch not taken renders nothing harmful; the load-time scan refuses it)
    with pytest.raises(ValueError, match="chat template of x refused") if name != \
            "in_untaken_branch" else contextlib.nullcontext():
        templates.render(payload, [{"role": "user", "content": "hi"}], source="x")
    why = templates.refusal(payload)
    assert why is not None and why  # refused at load, with a reason


def test_a_gguf_whose_template_carries_a_payload_loads_without_it(tmp_path, capsys):
    pytest.importorskip("gguf")
    import keenlm
    from keenlm.config import ModelConfig
    from keenlm.io.gguf_export import export_gguf
    from keenlm.model import build_model

    bpe = train_bpe(["<|im_start|>user\nhello<|im_end|>\n" * 50], 300)
    bpe.chat_template = PAYLOADS["cycler_globals_os"]  # what a hostile file would carry
    torch.manual_seed(0)
    net = build_model(ModelConfig(vocab_size=bpe.vocab_size, n_layer=1, d_model=32, n_head=2,
                                  d_ff=64, max_seq_len=32))
    path = export_gguf(net, bpe, tmp_path / "evil.gguf")
    km = keenlm.load(path)
    assert km.tokenizer.chat_template is None
    err = capsys.readouterr().err
    assert f"chat template of {path} is refused: it reaches for private attributes" in err
    with pytest.raises(ValueError, match="no chat template"):
        km.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    bpe.chat_template = OK
    good = keenlm.load(export_gguf(net, bpe, tmp_path / "good.gguf"))
    assert good.tokenizer.chat_template == OK
