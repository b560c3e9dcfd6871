"""``keenlm quantize MODEL OUT``: a packed low-bit model, 1.58/2/3/4 bits by round-to-nearest,
GPTQ or quantization-aware fine-tuning (keenlm.quant.recipe); every QuantConfig field is a flat
option (``--bits``, ``--method``)."""
from __future__ import annotations

from pathlib import Path

from keenlm.cli.options import add_dataclass_options, given
from keenlm.config import QuantConfig, section_from_dict
from keenlm.quant.folder import model_bytes, save_quantized
from keenlm.quant.recipe import quantize
from keenlm.runs import hold


def add_parser(sub, fmt):
    q = sub.add_parser("quantize", help="packed low-bit model: 1.58/2/3/4 bits by rtn, gptq or qat",
                       formatter_class=fmt)
    q.add_argument("model", help="run folder, .gguf file or Hugging Face folder")
    q.add_argument("out", help="output folder (a quantized model: keenlm generate|eval|info OUT)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    add_dataclass_options(q, QuantConfig)
    return q


def run(args) -> int:
    q = section_from_dict("quant", QuantConfig, given(args, QuantConfig), QuantConfig())
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out} exists (--overwrite replaces it)")
    with hold(out, "quantize"):  # one writer per output folder
        km = quantize(args.model, q, qat_dir=out.parent / f"{out.name}.qat-run")
        save_quantized(km, out, overwrite=args.overwrite)
    b = model_bytes(km)
    print(f"wrote {out}: {b['total'] / 1e6:.2f} MB of weights ({b['fp32_total'] / 1e6:.2f} MB in "
          f"fp32, {b['ratio']:.1f}x smaller)")
    return 0
