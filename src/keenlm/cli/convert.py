"""``keenlm convert SRC DST --to hf|gguf``: a run, GGUF file or HF folder written as an HF
folder or a GGUF file; LoRA adapters kept apart (peft's format beside an HF folder; llama.cpp's
LoRA GGUF beside a GGUF file, DST with .lora.gguf) or merged into the weights."""
from __future__ import annotations

import keenlm
from keenlm.io.gguf_export import QTYPES, export_gguf, export_gguf_lora
from keenlm.io.hf import export_hf
from keenlm.io.peft import load_adapter
from keenlm.model.lora import lora_layers, merge_lora


def add_parser(sub, fmt):
    c = sub.add_parser("convert", help="convert a run, GGUF or HF model to HF or GGUF",
                       formatter_class=fmt)
    c.add_argument("src", help="run folder, .gguf file or Hugging Face folder")
    c.add_argument("dst", help="output folder (hf) or .gguf file")
    c.add_argument("--to", choices=("hf", "gguf"), required=True, help="output format")
    c.add_argument("--type", default="f32", choices=QTYPES,
                   help="GGUF weight type: q8_0 8.5 bits per weight; for ternary models only, "
                        "tq1_0 1.69 or tq2_0 2.06")
    c.add_argument("--adapter", default="",
                   help="a peft LoRA adapter folder to apply to SRC first")
    c.add_argument("--merge-lora", action="store_true",
                   help="fold LoRA adapters into the weights (W + alpha/r B A); without it an HF "
                        "folder keeps them apart in adapter/ (peft's format) and a GGUF file "
                        "gets them beside it in llama.cpp's LoRA GGUF (DST.lora.gguf)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing HF folder")
    return c


def run(args) -> int:
    km = keenlm.load(args.src)
    if args.adapter:
        load_adapter(km.net, args.adapter)
    if lora_layers(km.net):
        if args.merge_lora:
            merge_lora(km.net)
    elif args.merge_lora:
        raise ValueError(f"{args.src} has no LoRA adapters to merge")
    if args.to == "hf":
        out = export_hf(km.net, km.tokenizer, args.dst, overwrite=args.overwrite)
    elif lora_layers(km.net):
        base, adapters = export_gguf_lora(km.net, km.tokenizer, args.dst, args.type)
        out = f"{base} and its LoRA adapters {adapters}"
    else:
        out = export_gguf(km.net, km.tokenizer, args.dst, args.type)
    print(f"wrote {out}")
    return 0
