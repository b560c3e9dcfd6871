"""Hugging Face folders in and out: keenlm models as ``LlamaForCausalLM``, and back; a
mixture-of-experts model out as ``MixtralForCausalLM`` (export only).

A Hugging Face model folder is a handful of plain files::

    config.json                    hyperparameters (``LlamaConfig``): widths, heads, RoPE, ...
    model.safetensors              the weights, named as in ``LlamaForCausalLM.state_dict()``
      or model-0000k-of-0000n.safetensors + model.safetensors.index.json (tensor -> shard)
    generation_config.json         default generation settings (the EOS id)
    tokenizer.json                 a ``tokenizers`` pipeline; tokenizer_config.json around it

keenlm's model *is* a Llama (see ``keenlm.model.transformer``): its parameter names are Hugging
Face's minus the ``model.`` prefix of the inner ``LlamaModel``, and RoPE uses the same
"rotate half" layout, so weights move across unchanged -- no q/k permutation, unlike GGUF.

Export (``export_hf``) writes all of it into a temporary folder beside ``out_dir`` and renames
it into place, so an interrupted export never leaves a half-written folder. A tied LM head is
left out of the file, as transformers itself does: with ``tie_word_embeddings`` it points
``lm_head.weight`` at the embedding and reports no missing key.

``config.json`` is written for two generations of readers: transformers 5 reads RoPE from
``rope_parameters = {"rope_type", "rope_theta"}`` and the dtype from ``dtype``; transformers 4
reads ``rope_theta``, ``rope_scaling`` and ``torch_dtype`` at the top level. Both sets are
written, and both are read back.

Import (``load_hf``) checks everything before a model is built: the architecture, features
keenlm does not implement (scaled RoPE, biases, a decoupled head_dim, another activation),
every tensor's presence, shape and dtype, and nothing left over. Weights are read with
safetensors only -- never ``torch.load``, whose pickles can run code. A failure raises
``HFError`` (a ``ValueError``) naming the file and the problem.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors import torch as st

from keenlm.config import ModelConfig, RunConfig
from keenlm.data.tokenizer import META_FILE, BPETokenizer, library_errors, load_tokenizer
from keenlm.io.loaders import Loaded, assemble, register
from keenlm.model import build_model, model_state
from keenlm.io.peft import save_adapter
from keenlm.model.lora import lora_layers
from keenlm.model.moe import expert_width
from keenlm.runs import atomic_folder

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
ARCH = "LlamaForCausalLM"
ADAPTER_DIR = "adapter"  # a LoRA model's adapters, in peft's format (keenlm.io.peft)
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")  # anything else (int8, fp8) is quantized: refused


class HFError(ValueError):
    def __init__(self, path, problem: str):
        super().__init__(f"{path}: {problem}")


# ---------------------------------------------------------------------------------------------
# export


def hf_config(cfg: ModelConfig, tokenizer) -> dict:
    """A vanilla ``LlamaConfig`` dict for ``cfg``, readable by transformers 4 and 5."""
    eos = tokenizer.eos_id
    # Tokenizer.save writes bos_token = eos_token when there is none; the ids agree with it.
    bos = tokenizer.token_to_id(tokenizer.bos_token) if tokenizer.bos_token else eos
    return {
        "architectures": [ARCH], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},  # v5
        "rope_theta": cfg.rope_theta, "rope_scaling": None,  # v4
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": None, "use_cache": True,
        "dtype": "float32", "torch_dtype": "float32",  # v5 name, v4 name
    } | (_mixtral(cfg) if cfg.ffn == "moe" else {})


def _mixtral(cfg: ModelConfig) -> dict:
    """What a ``MixtralConfig`` adds to Llama's: the experts (each of width moe.d_ff)."""
    return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
            "intermediate_size": expert_width(cfg), "num_local_experts": cfg.moe.experts,
            "num_experts_per_tok": cfg.moe.top_k, "router_aux_loss_coef": cfg.moe.aux_coef,
            "output_router_logits": False, "router_jitter_noise": 0.0, "sliding_window": None}


def hf_state(net) -> dict[str, torch.Tensor]:
    """keenlm weights under Hugging Face names, fp32, tied LM head omitted, LoRA adapters
    left out (the base weights only: keenlm.io.peft writes the adapters); an MoE layer's
    parts under Mixtral's names (block_sparse_moe.gate, experts.j.w1 = gate, w3 = up,
    w2 = down)."""
    out = {}
    for k, v in model_state(net).items():
        if k.endswith("mlp.expert_bias"):  # zero for every exportable model (checked above)
            continue
        if ".lora_A." in k or ".lora_B." in k:  # adapters go to their own folder (io/peft)
            continue
        k = k.replace(".base_layer.", ".")
        if ".mlp.gate." in k or ".mlp.experts." in k:
            k = k.replace(".mlp.", ".block_sparse_moe.")
            for ours, theirs in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
                k = k.replace(f".{ours}.", f".{theirs}.")
        out[k if k == "lm_head.weight" else "model." + k] = v.float().contiguous()
    return out


def _check_exportable(net, tokenizer) -> None:
    cfg = net.cfg
    if cfg.linear != "dense":
        raise ValueError(f"cannot export to Hugging Face: model.linear is {cfg.linear!r}, and "
                         f"LlamaForCausalLM / MixtralForCausalLM only have 'dense'")
    if cfg.memory.kind != "none" or cfg.attn_window:
        raise ValueError("cannot export to Hugging Face: model.memory and model.attn_window have "
                         "no counterpart in LlamaForCausalLM / MixtralForCausalLM")
    if cfg.spike.steps:
        raise ValueError("cannot export to Hugging Face: a spiking model (model.spike) has no "
                         "counterpart in transformers; export its spiking layers to NIR "
                         "(keenlm spike --nir), or its dense weights from the run it came from")
    if cfg.ffn == "moe":
        m = cfg.moe
        problems = []
        if m.shared:
            problems.append(f"model.moe.shared is {m.shared} (Mixtral has no shared experts)")
        if m.top_k < 2:
            problems.append("model.moe.top_k is 1 (Mixtral renormalizes the chosen weights to "
                            "sum to 1; keenlm's top-1 weight is the router probability)")
        if any(float(layer.mlp.expert_bias.abs().max()) > 0 for layer in net.layers):
            problems.append("the experts' selection biases (model.moe.balance bias) are not zero "
                            "(Mixtral's router has none)")
        if problems:
            raise ValueError("cannot export this mixture of experts as Mixtral: " + "; ".join(problems))
    if any(type(m.base_layer) is not torch.nn.Linear for m in lora_layers(net).values()):
        raise ValueError("cannot export to Hugging Face: the LoRA adapters sit on a quantized "
                         "base; merge them first (keenlm convert --merge-lora)")
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"cannot export: the tokenizer has {tokenizer.vocab_size} tokens but the "
                         f"model's embedding only {cfg.vocab_size}")


def export_hf(net, tokenizer, out_dir, *, overwrite: bool = False) -> Path:
    """Write ``net`` and ``tokenizer`` as a Hugging Face Llama folder; return its path. A model
    with LoRA adapters is written as its base weights, with the adapters in peft's format in
    the subfolder ``adapter`` (or merge them first: keenlm.model.lora.merge_lora).

    ``out_dir`` must not exist (or be empty) unless ``overwrite``: the folder is replaced whole.
    """
    _check_exportable(net, tokenizer)
    out = Path(out_dir)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise ValueError(f"{out}: already exists and is not empty (pass overwrite=True to "
                         "replace it)")
    config = hf_config(net.cfg, tokenizer)
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    with atomic_folder(out, replace=True) as tmp:
        # "format": "pt" is the metadata transformers checks to accept a safetensors file.
        st.save_file(hf_state(net), str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n",
                                                    encoding="utf-8")
        tokenizer.save(tmp)
        if lora_layers(net):  # the base above, the adapters in peft's format beside it
            save_adapter(net, tmp / ADAPTER_DIR, base=str(out))
        for f in tmp.iterdir():  # data on disk before the rename makes the folder visible
            if f.is_dir():
                continue
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    return out


# ---------------------------------------------------------------------------------------------
# import: config


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HFError(path, f"unreadable JSON ({e})") from None
    if not isinstance(data, dict):
        raise HFError(path, "expected a JSON object")
    return data


def _check_architecture(c: dict, path: Path) -> None:
    archs = c.get("architectures") or []
    if not isinstance(archs, list):
        raise HFError(path, f"architectures is {archs!r}, expected a list")
    if ARCH in archs or (not archs and c.get("model_type") == "llama"):
        return
    found = ", ".join(map(str, archs)) or f"model_type {c.get('model_type')!r}"
    raise HFError(path, f"architecture {found} is not supported (keenlm imports {ARCH}, "
                        "model_type 'llama')")


def _rope_theta(c: dict, path: Path) -> float:
    """RoPE base from either format; anything but plain RoPE (linear, dynamic, llama3, yarn
    scaling) would silently change every position's angle, so it is refused."""
    params = c.get("rope_parameters") or {}
    if isinstance(params, dict) and params and "rope_type" not in params \
            and all(isinstance(v, dict) for v in params.values()):
        raise HFError(path, f"per-layer-type RoPE parameters ({', '.join(params)}) are not supported")
    scaling = c.get("rope_scaling") or {}
    for where, d in (("rope_parameters", params), ("rope_scaling", scaling)):
        if not isinstance(d, dict):
            raise HFError(path, f"{where} is {d!r}, expected an object")
        kind = d.get("rope_type", d.get("type", "default"))
        if kind not in ("default", None):
            raise HFError(path, f"{where} has rope_type {kind!r}; only plain RoPE ('default') "
                                "is supported")
    theta = params.get("rope_theta", c.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not 1e-3 <= theta <= 1e12:
        raise HFError(path, f"rope_theta is {theta!r}, expected a number in [0.001, 1e12]")
    return float(theta)


def _check_features(c: dict, path: Path) -> None:
    for key in ("attention_bias", "mlp_bias"):
        if c.get(key):
            raise HFError(path, f"{key} is true; keenlm's Llama has no biases")
    act = c.get("hidden_act", "silu")
    if act != "silu":
        raise HFError(path, f"hidden_act {act!r} is not supported (only 'silu', SwiGLU)")
    if c.get("partial_rotary_factor") not in (None, 1, 1.0):
        raise HFError(path, f"partial_rotary_factor {c['partial_rotary_factor']} is not supported")
    hidden, heads = c.get("hidden_size"), c.get("num_attention_heads")
    head_dim = c.get("head_dim")
    if head_dim is not None and isinstance(hidden, int) and isinstance(heads, int) and heads > 0 \
            and head_dim != hidden // heads:
        raise HFError(path, f"head_dim {head_dim} differs from hidden_size / num_attention_heads "
                            f"= {hidden // heads}; keenlm derives head_dim from the width")


def model_config(c: dict, path: Path) -> ModelConfig:
    """ModelConfig from a config.json dict, or HFError naming the key that does not fit."""
    _check_architecture(c, path)
    _check_features(c, path)
    theta = _rope_theta(c, path)

    def need(key, default=None, hi=1 << 24, lo=-(1 << 24)):
        v = c.get(key)
        v = default if v is None else v  # a key written as null means "the default" too
        if v is None:
            raise HFError(path, f"key {key} is missing")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise HFError(path, f"key {key} is {v!r}, expected a number")
        if not lo <= v <= hi:  # sizes things (the rotary tables) before a tensor is read
            raise HFError(path, f"key {key} is {v!r}, out of range [{lo}, {hi}]")
        return v

    heads = int(need("num_attention_heads", lo=1))
    try:
        return ModelConfig(
            vocab_size=int(need("vocab_size", lo=1)), n_layer=int(need("num_hidden_layers", lo=1)),
            d_model=int(need("hidden_size", lo=1)), n_head=heads,
            n_kv_head=int(need("num_key_value_heads", heads, lo=1)),
            d_ff=int(need("intermediate_size", lo=1)),
            max_seq_len=int(need("max_position_embeddings", 2048, hi=1 << 20, lo=1)),
            rope_theta=theta,
            norm_eps=float(need("rms_norm_eps", 1e-6)),  # LlamaConfig's default
            tie_embeddings=bool(c.get("tie_word_embeddings", False)),
            init_std=float(need("initializer_range", 0.02)), attention="sdpa")
    except ValueError as e:
        raise HFError(path, f"hyperparameters out of range: {e}") from None


# ---------------------------------------------------------------------------------------------
# import: weights


def _shards(folder: Path) -> list[Path]:
    """The safetensors files holding the weights: one file, or the shards its index names."""
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    index = folder / INDEX
    if not index.is_file():
        raise HFError(folder, f"no {WEIGHTS} and no {INDEX}")
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise HFError(index, "no weight_map")
    files = []
    for name in sorted(set(map(str, weight_map.values()))):
        # a shard name is a plain file name; a path could point outside the model folder
        if Path(name).name != name or not name.endswith(".safetensors"):
            raise HFError(index, f"shard {name!r} is not a .safetensors file in this folder")
        if not (folder / name).is_file():
            raise HFError(index, f"shard {name} is missing")
        files.append(folder / name)
    return files


def _keenlm_name(name: str) -> str | None:
    """HF tensor name -> keenlm name; None for what carries no weights (RoPE inv_freq tables)."""
    if name.endswith("rotary_emb.inv_freq"):
        return None
    return name.removeprefix("model.")


def _read_shard(file: Path, expected: dict[str, tuple], state: dict, origin: dict) -> None:
    """Add every tensor of ``file`` to ``state`` as fp32, checking name, dtype and shape."""
    try:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                key = _keenlm_name(name)
                if key is None:
                    continue
                if key in origin:
                    raise HFError(file, f"tensor {name} is also in {origin[key].name}")
                if key not in expected:
                    raise HFError(file, f"unexpected tensor {name} (not part of a plain Llama "
                                        "with this config.json)")
                sl = f.get_slice(name)
                if sl.get_dtype() not in FLOAT_DTYPES:
                    raise HFError(file, f"tensor {name} has dtype {sl.get_dtype()}; only "
                                        f"{', '.join(FLOAT_DTYPES)} are supported (no quantized "
                                        "checkpoints)")
                if tuple(sl.get_shape()) != expected[key]:
                    raise HFError(file, f"tensor {name} has shape {tuple(sl.get_shape())}, "
                                        f"config.json implies {expected[key]}")
                state[key] = f.get_tensor(name).to(torch.float32).contiguous()
                origin[key] = file
    except (SafetensorError, OSError) as e:  # truncated or corrupt files land here
        raise HFError(file, f"cannot read safetensors file ({e})") from None


def read_state(folder: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Every weight under keenlm names, fp32; missing, extra or mis-shaped tensors are errors."""
    files = _shards(folder)
    blocks = set()
    for file in files:  # the headers alone: how many blocks the weights hold
        try:
            with safe_open(str(file), framework="pt") as f:
                blocks |= {n.split(".layers.")[1].split(".")[0] for n in f.keys()
                           if n.endswith(".self_attn.q_proj.weight") and ".layers." in n}
        except (SafetensorError, OSError) as e:
            raise HFError(file, f"cannot read safetensors file ({e})") from None
    if cfg.n_layer != len(blocks):  # before a model of that many blocks is built, even on meta
        raise HFError(folder / CONFIG, f"num_hidden_layers is {cfg.n_layer}; the weights hold "
                                       f"{len(blocks)} blocks")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for file in files:
        _read_shard(file, expected, state, origin)
    if cfg.tie_embeddings and "lm_head.weight" in state:
        # Some exporters write the tied head anyway; harmless only when it is the same matrix.
        head = state.pop("lm_head.weight")
        if "embed_tokens.weight" in state and not torch.equal(head, state["embed_tokens.weight"]):
            raise HFError(origin["lm_head.weight"], "tensor lm_head.weight differs from "
                          "model.embed_tokens.weight but config.json says tie_word_embeddings")
    needed = [k for k in expected if not (cfg.tie_embeddings and k == "lm_head.weight")]
    missing = [k for k in needed if k not in state]
    if missing:
        hf = [k if k == "lm_head.weight" else "model." + k for k in missing]
        raise HFError(folder, f"tensor {hf[0]} is missing" +
                      (f" (and {len(hf) - 1} more)" if len(hf) > 1 else ""))
    return state


# ---------------------------------------------------------------------------------------------
# import: tokenizer


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _token_for_id(hf, value) -> str | None:
    if isinstance(value, list):  # config.json may list several EOS ids; the first is canonical
        value = value[0] if value else None
    return hf.id_to_token(int(value)) if isinstance(value, int) else None


def _chat_template(folder: Path, tcfg: dict) -> str | None:
    """From tokenizer_config.json (a string, or a list of named templates) or, as transformers 5
    saves it, from chat_template.jinja."""
    t = tcfg.get("chat_template")
    if isinstance(t, list):
        t = next((x.get("template") for x in t if x.get("name") == "default"), None)
    if not t and (folder / "chat_template.jinja").is_file():
        t = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return t or None


def _adds_bos(tok_json: dict, bos: str | None) -> bool:
    """Whether the post-processor puts BOS first (Llama 3 does, with no add_bos_token key)."""
    post = tok_json.get("post_processor") or {}
    procs = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for p in procs:
        single = (p.get("single") or []) if p.get("type") == "TemplateProcessing" else []
        if single and single[0].get("SpecialToken", {}).get("id") == bos:
            return True
    return False


def read_tokenizer(folder: Path, config: dict):
    """keenlm's own tokenizer files if present, else a byte-level BPE from tokenizer.json."""
    from tokenizers import Tokenizer as HFTokenizer

    if (folder / META_FILE).is_file():
        return load_tokenizer(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise HFError(folder, "no tokenizer.json (keenlm needs a byte-level BPE tokenizer.json; "
                              "SentencePiece tokenizer.model files are not supported)")
    tok_json = _read_json(path)
    kind = (tok_json.get("model") or {}).get("type")
    if kind != "BPE":
        raise HFError(path, f"tokenizer model is {kind!r}; only byte-level BPE is supported")
    with library_errors(lambda why: HFError(path, f"not a valid Hugging Face tokenizer file "
                                                  f"({why})")):
        hf = HFTokenizer.from_file(str(path))
    tcfg_path = folder / "tokenizer_config.json"
    tcfg = _read_json(tcfg_path) if tcfg_path.is_file() else {}
    eos = _token_text(tcfg.get("eos_token")) or _token_for_id(hf, config.get("eos_token_id"))
    bos = _token_text(tcfg.get("bos_token")) or _token_for_id(hf, config.get("bos_token_id"))
    if eos is None:
        raise HFError(folder, "no EOS token in tokenizer_config.json or config.json")
    add_bos = tcfg["add_bos_token"] if "add_bos_token" in tcfg else _adds_bos(tok_json, bos)
    # Imported vocabularies may lack symbols for bytes that never occur in UTF-8 text.
    return BPETokenizer(hf, eos_token=eos, source=str(path), bos_token=bos,
                        add_bos=bool(add_bos), chat_template=_chat_template(folder, tcfg),
                        require_all_bytes=False)


def load_hf(folder):
    """(model config, fp32 state dict with keenlm names, tokenizer) from a Hugging Face folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HFError(folder, "not a folder")
    config_path = folder / CONFIG
    if not config_path.is_file():
        raise HFError(folder, f"no {CONFIG}")
    config = _read_json(config_path)
    cfg = model_config(config, config_path)
    tokenizer = read_tokenizer(folder, config)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise HFError(folder, f"the tokenizer has {tokenizer.vocab_size} tokens but config.json's "
                              f"vocab_size is {cfg.vocab_size}")
    return cfg, read_state(folder, cfg), tokenizer


def is_hf_folder(path: Path) -> bool:
    return (path.is_dir() and (path / CONFIG).exists() and not (path / "checkpoints").exists()
            and any(path.glob("*.safetensors*")))


def _load(path: Path, device: str) -> Loaded:
    cfg_m, state, tok = load_hf(path)
    return assemble(RunConfig(model=cfg_m), state, tok, device)


register("Hugging Face folder", is_hf_folder, _load)
