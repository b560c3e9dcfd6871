"""``keenlm quantize MODEL --bits 1.58|2|3|4 --method rtn|gptq|qat``: packed low-bit models.

Any model keenlm loads (a run folder, a GGUF file, a Hugging Face folder) becomes a *quantized
model folder*: every block projection in the packed format of keenlm.model.packing, the token
embedding and an untied LM head stored as chosen (fp32, fp16 or int8 rows), the rest (norms)
fp32:

    OUT/config.json          the source model's RunConfig
    OUT/quant.json           format version, bits, method, group, embed/head storage, and per
                             packed layer its bits, group and input width
    OUT/model.safetensors    packed codes (uint8), scales and offsets, int8/fp16 tables, norms
    OUT/tokenizer/

``keenlm.load(OUT)`` (and so ``keenlm generate|eval|chat OUT``) runs it on the packed fast paths;
``keenlm info OUT`` reports its bytes against the same model in fp32. Methods:

- ``rtn``: round to nearest on a fitted grid (keenlm.model.ptq);
- ``gptq``: GPTQ calibrated on stdlib text (the run's own training split for keenlm runs);
- ``qat``: quantization-aware fine-tuning (keenlm.model.lowbit, through the Trainer with the
  model as its starting point), then ``convert_qat``: ternary and 2-bit with one learned scale
  per row, 4-bit symmetric groups.

The folder is written whole to a temporary name and renamed into place: an interrupted run
leaves no half-written model.
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from keenlm.config import DataConfig, QuantConfig, RunConfig, TrainConfig, from_dict, save_json

FORMAT = 1


def _calibration(km, q: QuantConfig, log) -> torch.Tensor:
    """(calib_seqs, calib_len) token windows from the training split of the model's corpus
    (a keenlm run's own data; stdlib for imported models), drawn with ``q.seed``."""
    from keenlm.data import default_cache_dir, get_batch, load_corpus, tokenize_corpus

    data_cfg = km.config.data if km.run_dir is not None else DataConfig(max_bytes=4_000_000)
    data = tokenize_corpus(load_corpus(data_cfg), km.tokenizer, default_cache_dir(data_cfg.cache_dir),
                           log=log)
    T = min(q.calib_len, km.config.model.max_seq_len)
    x, _ = get_batch(data.train, q.calib_seqs, T, q.seed, 0)
    return x


def _qat(km, q: QuantConfig, group: int, run_dir: Path, log) -> None:
    """Quantization-aware fine-tuning of km.net in place, through the Trainer."""
    from keenlm.train import Trainer

    m = km.config.model
    group = group or m.d_model
    model = dataclasses.replace(m, linear=q.kind, lowbit_group=group if q.kind == "int4" else
                                m.lowbit_group, lowbit_per_channel=True)
    data = km.config.data if km.run_dir is not None else DataConfig(max_bytes=4_000_000)
    train = TrainConfig(steps=q.qat_steps, lr=q.qat_lr, batch_size=q.qat_batch,
                        seq_len=min(256, m.max_seq_len), warmup_steps=max(1, q.qat_steps // 20),
                        schedule="cosine", weight_decay=0.0, eval_every=0, out_dir=str(run_dir),
                        resume=False, seed=q.seed + 1, progress=log is not None)
    tr = Trainer(RunConfig(model=model, data=data, train=train), init=km)
    res = tr.fit()
    if log:
        log(f"qat: {res.step} steps, val loss {res.final_eval['loss']:.4f}; run folder {run_dir}")
    km.net.eval()


@torch.no_grad()
def store_tables(net, q: QuantConfig) -> None:
    """The embedding (and an untied head) as ``q.embed`` / ``q.head`` say."""
    from keenlm.infer.int8 import Int8Embedding, Int8Linear, quantize_rows_int8

    tied = net.lm_head.weight is net.embed_tokens.weight
    if q.embed == "int8":
        w8, s = quantize_rows_int8(net.embed_tokens.weight)
        net.embed_tokens = Int8Embedding(w8, s)
        if tied:  # the head reads the same int8 rows
            net.lm_head = Int8Linear(weight_int8=w8, scale=s)
    elif q.embed == "fp16":
        net.embed_tokens.weight.copy_(net.embed_tokens.weight.half().float())
    if not tied:
        if q.head == "int8":
            net.lm_head = Int8Linear(net.lm_head.weight)
        elif q.head == "fp16":
            net.lm_head.weight.copy_(net.lm_head.weight.half().float())


def _fit_group(net, q: QuantConfig, log) -> int:
    """The group size: as given; by default 64, halved until it divides every projection's
    input width (a SwiGLU width of 352 takes groups of 32), and said so."""
    group = q.group_size
    if q.group != -1 or group == 0:
        return group
    widths = {m.in_features for name, m in net.named_modules()
              if type(m) is nn.Linear and not name.endswith("lm_head")}
    while group > 8 and any(w % group for w in widths):
        group //= 2
    if group != q.group_size and log:
        log(f"quantize: groups of {q.group_size} do not divide every layer width "
            f"{sorted(widths)}; using groups of {group}")
    return group


def quantize(model, q: QuantConfig, *, log: Callable[[str], None] | None = print,
             qat_dir: str | Path | None = None):
    """Quantize ``model`` (a path or a keenlm.load result) in place; returns the KeenModel with
    ``.quant`` (what quant.json records)."""
    from keenlm.api import load
    from keenlm.model import ptq
    from keenlm.model.packing import PackedLinear, convert_qat

    km = load(model) if isinstance(model, (str, Path)) else model
    if any(isinstance(m, PackedLinear) for m in km.net.modules()):
        raise ValueError("the model is already quantized")
    group = _fit_group(km.net, q, log)
    km.net.eval()
    if q.method == "rtn":
        ptq.quantize_rtn(km.net, q.kind, group)
    elif q.method == "gptq":
        calib = _calibration(km, q, log)
        if log:
            log(f"gptq: {calib.shape[0]} x {calib.shape[1]} calibration tokens")
        ptq.quantize_gptq(km.net, q.kind, group, calib, log=log)
    else:
        run_dir = Path(qat_dir) if qat_dir else Path(tempfile.mkdtemp(prefix="keenlm-qat-"))
        _qat(km, q, group, run_dir, log)
        convert_qat(km.net)
    store_tables(km.net, q)
    layers = {name: {"bits": m.bits, "group": m.group, "in_features": m.in_features,
                     "act_bits": m.act_bits}
              for name, m in km.net.named_modules() if isinstance(m, PackedLinear)}
    km.quant = {"format": FORMAT, "bits": q.bits, "method": q.method, "group": group,
                "embed": q.embed, "head": q.head, "tied": km.config.model.tie_embeddings,
                "config": dataclasses.asdict(q), "layers": layers}
    return km


def save_quantized(km, out: str | Path, overwrite: bool = False) -> Path:
    """Write a quantized KeenModel as a folder (see the module docstring), atomically."""
    from safetensors.torch import save_file

    from keenlm.data.cache import atomic_folder

    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (overwrite=True / --overwrite replaces it)")
    state = km.net.state_dict()
    if km.quant["tied"]:
        state = {k: v for k, v in state.items() if not k.startswith("lm_head.")}
    if km.quant["embed"] == "fp16":
        state["embed_tokens.weight"] = state["embed_tokens.weight"].half()
    if km.quant["head"] == "fp16" and "lm_head.weight" in state:
        state["lm_head.weight"] = state["lm_head.weight"].half()
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_folder(out, replace=True) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "keenlm-packed"})
        save_json(km.config, tmp / "config.json")
        (tmp / "quant.json").write_text(json.dumps(km.quant, indent=2) + "\n")
        km.tokenizer.save(tmp / "tokenizer")
    return out


def is_quantized_folder(path: Path) -> bool:
    return (path / "quant.json").exists()


def load_quantized(path: Path, device: str = "cpu"):
    """Build a model from a quantized folder: every tensor checked before it is used."""
    from keenlm import runs
    from keenlm.api import KeenModel
    from keenlm.data import load_tokenizer
    from keenlm.infer.int8 import Int8Embedding, Int8Linear
    from keenlm.model import build_model, load_model_state
    from keenlm.model.packing import PackedLinear, fuse_packed

    try:
        spec = json.loads((path / "quant.json").read_text())
        cfg = from_dict(json.loads((path / "config.json").read_text()))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable quant.json/config.json ({e})") from e
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise ValueError(f"{path}/quant.json: not format {FORMAT} of a keenlm quantized model")
    missing = [k for k in ("layers", "embed", "head", "tied") if k not in spec]
    if missing or not isinstance(spec["layers"], dict):
        raise ValueError(f"{path}/quant.json: missing or malformed {missing or ['layers']}")
    state = runs.load_model_state(path)  # safetensors: a truncated or corrupt file is an error
    with torch.device("meta"):
        net = build_model(dataclasses.replace(cfg.model, linear="dense"))
    net = net.to_empty(device="cpu")
    net.tie_weights()
    net.reset_buffers()

    def take(name: str) -> torch.Tensor:
        if name not in state:
            raise ValueError(f"{path}/model.safetensors: tensor {name!r} is missing")
        return state[name]

    for name, L in spec["layers"].items():
        parent_name, _, attr = name.rpartition(".")
        try:
            parent = net.get_submodule(parent_name) if parent_name else net
        except AttributeError:
            parent = None
        old = getattr(parent, attr, None)
        if not isinstance(old, nn.Linear) or old.in_features != L["in_features"]:
            raise ValueError(f"{path}: quant.json names {name!r}, which the model config does not have")
        try:
            mod = PackedLinear(take(f"{name}.packed"), take(f"{name}.scale"), take(f"{name}.offset"),
                               bits=int(L["bits"]), in_features=int(L["in_features"]),
                               group=int(L["group"]), act_bits=int(L.get("act_bits", 0)))
        except (ValueError, KeyError) as e:
            raise ValueError(f"{path}: layer {name!r}: {e}") from e
        if mod.out_features != old.out_features:
            raise ValueError(f"{path}: layer {name!r} has {mod.out_features} rows, the model "
                             f"config {old.out_features}")
        setattr(parent, attr, mod)
    int8 = lambda prefix: dict(weight_int8=take(f"{prefix}.weight_int8"),  # noqa: E731
                               scale=take(f"{prefix}.scale"))
    if spec["embed"] == "int8":
        net.embed_tokens = Int8Embedding(**int8("embed_tokens"))
        if spec["tied"]:
            net.lm_head = Int8Linear(**int8("embed_tokens"))
            state = {**state, "lm_head.weight_int8": state["embed_tokens.weight_int8"],
                     "lm_head.scale": state["embed_tokens.scale"]}
    if not spec["tied"] and spec["head"] == "int8":
        net.lm_head = Int8Linear(**int8("lm_head"))
    load_model_state(net, state)  # strict: every remaining tensor present, nothing extra
    fuse_packed(net)
    net.to(torch.device(device)).eval()
    km = KeenModel(net, load_tokenizer(path / "tokenizer"), cfg, None)
    km.quant = spec
    return km


def model_bytes(km) -> dict:
    """Bytes of the weights as stored, by part, and of the same model in fp32."""
    from keenlm.model import build_model
    from keenlm.model.packing import PackedLinear

    parts = {"packed": 0, "embedding": 0, "head": 0, "other": 0}
    seen = set()
    for name, t in km.net.state_dict(keep_vars=True).items():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        mod = km.net.get_submodule(name.rpartition(".")[0])
        size = t.numel() * t.element_size()
        if isinstance(mod, PackedLinear):
            parts["packed"] += size
        elif name.startswith("embed_tokens."):
            parts["embedding"] += size // (2 if km.quant.get("embed") == "fp16" else 1)
        elif name.startswith("lm_head."):
            parts["head"] += size // (2 if km.quant.get("head") == "fp16" else 1)
        else:
            parts["other"] += size
    with torch.device("meta"):  # the same model in fp32 (parameters() counts a tied one once)
        dense = build_model(dataclasses.replace(km.config.model, linear="dense"))
    parts["total"] = sum(parts.values())
    parts["fp32_total"] = 4 * sum(p.numel() for p in dense.parameters())
    parts["ratio"] = parts["fp32_total"] / parts["total"]
    return parts
