"""The one compiled part of keenlm: the quantized matrix-vector kernels of keenlm.quant.q4
(C, built by pip with the machine's compiler at install). ``optional``: without a compiler
the install still succeeds and keenlm says, once, that it uses the reference path."""
from setuptools import Extension, setup

setup(ext_modules=[Extension("keenlm.quant._qdot", ["src/keenlm/quant/csrc/qdot.c"],
                             extra_compile_args=["-O3", "-std=c11", "-pthread"],
                             extra_link_args=["-pthread"], optional=True)])
