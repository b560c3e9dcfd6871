"""The compiled parts of keenlm (C, built by pip with the machine's compiler at install):

- keenlm.quant._qdot: the quantized matrix-vector kernels of keenlm.quant.q4 and the thread
  pool they share (quant/csrc);
- keenlm.infer._step: the decode step of keenlm.infer.engine (infer/csrc), which reaches the
  kernels and the pool through _qdot's capsule (quant/csrc/qdot.h).

``optional``: without a compiler the install still succeeds and keenlm says, once, that it uses
the reference path."""
from setuptools import Extension, setup

FLAGS = dict(extra_compile_args=["-O3", "-std=c11", "-pthread", "-fopenmp-simd"],
             extra_link_args=["-pthread"], optional=True)

setup(ext_modules=[
    Extension("keenlm.quant._qdot", ["src/keenlm/quant/csrc/module.c",
                                     "src/keenlm/quant/csrc/qdot.c",
                                     "src/keenlm/quant/csrc/tq2.c",
                                     "src/keenlm/quant/csrc/pool.c"],
              depends=["src/keenlm/quant/csrc/qdot.h"], **FLAGS),
    Extension("keenlm.infer._step", ["src/keenlm/infer/csrc/step.c"],
              depends=["src/keenlm/quant/csrc/qdot.h", "src/keenlm/infer/csrc/attend512.h",
                       "src/keenlm/infer/csrc/lora.h"], **FLAGS),
])
