"""Low-bit weights: 2-bit, ternary and 4-bit models, trained or converted.

    config.py    model.lowbit.* and keenlm quantize's QuantConfig
    qat.py       quantization-aware linears (BitNet b1.58 ternary, ParetoQ 2-bit, int4 groups)
    ptq.py       post-training quantization: round-to-nearest and GPTQ
    packing.py   the packed weight format and PackedLinear (reference beside the fast path)
    kernels.py   packed CPU kernels (numba lookup-table matmul)
    int8.py      weight-only int8 inference (embedding and linears)
    int4.py      weight-only int4 inference
    q4.py        4-bit x int8 integer-dot-product kernel for decoding (C: csrc/qdot.c)
    folder.py    the quantized-model folder (registered in keenlm.io.loaders)
    recipe.py    keenlm quantize: rtn, gptq or qat, written as a quantized folder
"""
