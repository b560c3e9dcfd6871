"""Neuromorphic execution: the feed-forward layers run as spiking networks.

    config.py     model.spike.*
    neurons.py    IF/LIF neurons, the rate code and its surrogate gradient
    kernels.py    the numba rate-code kernel (the tensor loop in neurons.py is its reference;
                  compiled in rate_numba.py, imported on first use)
    ffn.py        the spiking SwiGLU, conversion with threshold balancing
    energy.py     synaptic operations and energy per token, naive and memory-inclusive
    converter.py  conversion and fine-tuning in the trainer (keenlm.train.converters)
    nir.py        export to NIR
    recipe.py     keenlm spike: a trained model evaluated as a spiking network
"""
