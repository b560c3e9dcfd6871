"""Low-bit weights: 2-bit, ternary and 4-bit models, trained or converted.

    config.py    model.lowbit.* and keenlm quantize's QuantConfig
    qat.py       quantization-aware linears (BitNet b1.58 ternary, ParetoQ 2-bit, int4 groups)
    ptq.py       post-training quantization: round-to-nearest and GPTQ
    packing.py   the packed weight format and PackedLinear (reference beside the fast path)
    kernels.py   packed CPU kernels (numba lookup-table matmul; compiled in lut_numba.py)
    int8.py      weight-only int8 inference (embedding and linears)
    int4.py      weight-only int4 inference
    q4.py        Q4 and Q8_0 blocks x int8 activations, integer dot products, for decoding
    tq2.py       ternary TQ2_0 blocks x int8 activations, the same way
    csrc/        the C kernels (qdot.c, tq2.c), their thread pool (pool.c), the Python module
                 (module.c); keenlm.infer._step reaches them through qdot.h's capsule
    folder.py    the quantized-model folder (registered in keenlm.io.loaders)
    recipe.py    keenlm quantize: rtn, gptq or qat, written as a quantized folder
"""
