"""Export of a spiking keenlm model's feed-forward layers to NIR (Neuromorphic Intermediate
Representation, https://neuroir.org, PyPI ``nir``), the format that snnTorch, Norse, Lava,
Rockpool, Sinabs and chips such as Loihi 2, SpiNNaker2 and Xylo read.

Each spiking layer i becomes two NIR graphs, its two stages (keenlm.spiking.ffn):

    layers.i.in:   input x (C) -> Affine [diag(1/lambda); -diag(1/lambda)] + 1/(2T) (2C)
                   -> LIF (2C) -> Linear [W_gate; W_up] [diag(lambda), -diag(lambda)] / T (2F)
                   -> output: per step, the hidden currents; summed over the T steps, gate | up
    layers.i.out:  input a = silu(gate) * up (F) -> Affine (2F) -> LIF (2F)
                   -> Linear W_down [diag(lambda), -diag(lambda)] / T (C) -> output

held as the nodes of one top-level graph (no edges between them: the gate product and the rest
of the transformer -- attention, norms, residual stream -- stay on the host). The per-channel
scales lambda are folded into the weights, so every neuron has threshold 1 (snnTorch's importer
requires one threshold per population).

The neurons: NIR's LIF and IF reset to v_reset (here 0) when they fire; they cannot reset by
subtraction. So only models converted or fine-tuned with ``model.spike.reset: zero`` export;
others are refused with that reason. beta < 1 becomes a LIF with tau = dt / (1 - beta) and
r = tau / dt at dt = 1e-4 s, the step snnTorch's importer assumes (it recovers beta = 1 - dt /
tau, and an input weight of 1); beta = 1 becomes an IF with r = 1 (snnTorch 1.0.0's importer
builds a leaky neuron with beta 0.9 from an IF node, so that case does not round-trip there).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from keenlm.spiking.ffn import spiking_layers

DT = 1e-4  # seconds per step, as snnTorch's NIR importer assumes


def _neuron(n: int, beta: float):
    import nir  # optional extra: keenlm[neuro]

    zeros, ones = np.zeros(n, np.float32), np.ones(n, np.float32)
    if beta == 1.0:
        return nir.IF(r=ones, v_threshold=ones, v_reset=zeros)
    tau = np.full(n, DT / (1.0 - beta), np.float64)
    return nir.LIF(tau=tau, r=tau / DT, v_leak=zeros, v_threshold=ones, v_reset=zeros)


def stage_graph(scale: torch.Tensor, weight: torch.Tensor, spike):
    """One stage as a NIR graph: values (n) -> pairs of neurons -> weight (out, n) per step."""
    import nir  # optional extra: keenlm[neuro]

    n, T = scale.numel(), spike.steps
    inv = (1.0 / scale.detach().float()).cpu()
    enc = torch.cat([torch.diag(inv), -torch.diag(inv)]).numpy()  # (2n, n)
    bias = np.full(2 * n, 0.5 / T if spike.round else 0.0, np.float32)
    w = weight.detach().float().cpu() * scale.detach().float().cpu()
    syn = (torch.cat([w, -w], dim=1) / T).numpy()  # (out, 2n)
    nodes = {"input": nir.Input(input_type=np.array([n])),
             "encode": nir.Affine(weight=enc, bias=bias),
             "neurons": _neuron(2 * n, spike.beta),
             "synapse": nir.Linear(weight=syn),
             "output": nir.Output(output_type=np.array([weight.shape[0]]))}
    edges = [("input", "encode"), ("encode", "neurons"), ("neurons", "synapse"),
             ("synapse", "output")]
    return nir.NIRGraph(nodes=nodes, edges=edges)


def to_nir(net):
    """The spiking layers of ``net`` as one NIR graph (see the module docstring)."""
    import nir  # optional extra: keenlm[neuro]

    layers = spiking_layers(net)
    if not layers:
        raise ValueError("NIR export: the model has no spiking layers (convert it first: "
                         "keenlm spike MODEL --steps T --out DIR)")
    spike = net.cfg.spike
    if spike.reset != "zero":
        raise ValueError(f"NIR export: model.spike.reset is {spike.reset!r}, but NIR's neurons "
                         "reset to a value when they fire, not by subtraction; convert or "
                         "fine-tune with model.spike.reset zero to export")
    nodes = {}
    for i, m in enumerate(layers):
        gate_up = torch.cat([m.gate_proj.weight, m.up_proj.weight])
        nodes[f"layers.{i}.in"] = stage_graph(m.in_scale, gate_up, spike)
        nodes[f"layers.{i}.out"] = stage_graph(m.hidden_scale, m.down_proj.weight, spike)
    meta = {"producer": "keenlm", "steps": spike.steps, "beta": spike.beta, "reset": spike.reset,
            "dt": DT, "note": "per layer: stage in (x -> gate|up currents), host computes "
                              "silu(gate) * up from the currents summed over the steps, stage "
                              "out (a -> down-projection currents)"}
    return nir.NIRGraph(nodes=nodes, edges=[], metadata=meta)


def export_nir(net, path) -> Path:
    """Write ``to_nir(net)`` to ``path`` (HDF5), atomically."""
    import nir  # optional extra: keenlm[neuro]

    graph = to_nir(net)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        nir.write(tmp, graph)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
