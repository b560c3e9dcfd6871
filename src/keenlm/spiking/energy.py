"""Operations and energy of spiking feed-forward layers, against the dense layers they replace.

**Accounting** (``spike_energy``): spikes and firing rates per layer; synaptic operations
(accumulates: spikes x fan-out) against the multiply-accumulates of the dense layer; energy per
token with the 45 nm figures of Horowitz (ISSCC 2014) that SNN papers use -- 4.6 pJ per 32-bit
MAC, 0.9 pJ per 32-bit accumulate -- and a memory-inclusive estimate that adds the movement
those figures leave out: a weight read per synaptic event, a membrane read and write per neuron
per step, each spike written and read once, against the dense layer's weight and activation
traffic (5 pJ per 32-bit SRAM access: Horowitz's 10 pJ per 64-bit read of an 8 KB SRAM). Yan et
al. 2024 show the first estimate flatters spiking networks; both are reported.
"""
from __future__ import annotations

import torch

from keenlm.ledger import flops_per_token
from keenlm.spiking.ffn import spiking_layers

E_MAC_PJ = 4.6  # 32-bit floating-point multiply-accumulate, 45 nm (Horowitz 2014)
E_AC_PJ = 0.9  # 32-bit floating-point add
E_MEM_PJ = 5.0  # one 32-bit access of an 8 KB SRAM (10 pJ per 64-bit read)


def _layer_energy(s: dict, C: int, Fw: int, T: int, e_mac: float, e_ac: float, e_mem: float,
                  e_upd: float) -> dict:
    """One layer's operations and energies per token (pJ), spiking and dense (see below)."""
    synops = s["in_spikes"] * 2 * Fw + s["hidden_spikes"] * C
    macs = 3 * C * Fw
    spikes = s["in_spikes"] + s["hidden_spikes"]
    updates = (2 * C + 2 * Fw) * T
    analog_s, analog_d = C + Fw + 3 * Fw, 3 * Fw
    naive_s = synops * e_ac + analog_s * e_mac
    naive_d = (macs + analog_d) * e_mac
    mem_s = naive_s + updates * e_upd + e_mem * (synops + 2 * updates + 2 * spikes)
    mem_d = naive_d + e_mem * (macs + 2 * C + 6 * Fw)
    return {"synops": synops, "macs_dense": macs, "naive_spiking": naive_s, "naive_dense": naive_d,
            "memory_spiking": mem_s, "memory_dense": mem_d, "spikes": spikes, "updates": updates}


def spike_energy(net, stats: list[dict], seq_len: int, e_mac: float = E_MAC_PJ,
                 e_ac: float = E_AC_PJ, e_mem: float = E_MEM_PJ) -> dict:
    """Operations and energy per token of the feed-forward layers, spiking against dense, from
    each spiking layer's ``take_stats`` (same order as the layers); and of the whole model,
    whose other parts (attention, norms, LM head) are the same analog operations in both.

    Per layer and token, with C = d_model, F = d_ff, T steps, s_in / s_h spikes:
      synaptic ops (accumulates)   s_in * 2F + s_h * C         dense MACs   3 C F
      neuron updates               (2C + 2F) T  (an AC if beta = 1, else a MAC)
      analog ops (both)            C + F current scalings (spiking only) and 3F for the gate
                                   silu(g) u (both)
      naive energy    spiking: synops e_ac + analog e_mac;     dense: (3CF + 3F) e_mac
      memory-incl.    + e_mem x (spiking: synops weight reads + 2 per neuron update + 2 per spike;
                                 dense: 3CF weight reads + (2C + 6F) activation accesses)
                      + spiking neuron updates' own arithmetic
    """
    layers = spiking_layers(net)
    if len(stats) != len(layers) or not layers:
        raise ValueError(f"spike_energy: {len(stats)} statistics for {len(layers)} spiking layers")
    cfg = net.cfg
    C, Fw, T = cfg.d_model, cfg.d_ff, cfg.spike.steps
    e_upd = e_ac if cfg.spike.beta == 1.0 else e_mac
    rows, tot = [], {k: 0.0 for k in ("synops", "macs_dense", "naive_spiking", "naive_dense",
                                      "memory_spiking", "memory_dense", "spikes", "updates")}
    for i, s in enumerate(stats):
        layer = _layer_energy(s, C, Fw, T, e_mac, e_ac, e_mem, e_upd)
        rows.append({"layer": i, "in_rate": s["in_rate"], "hidden_rate": s["hidden_rate"],
                     "synops": layer["synops"], "macs_dense": layer["macs_dense"]})
        for k in tot:
            tot[k] += layer[k]
    # the rest of the model: analog multiply-accumulates (and weight reads) in both
    other_macs = flops_per_token(net, seq_len)["forward"] / 2 - tot["macs_dense"]
    other_weights = sum(p.numel() for n, p in net.named_parameters()  # read once per token
                        if ".mlp." not in n and not n.startswith(("embed_tokens", "lm_head"))) + \
        net.lm_head.weight.numel()  # tied or not, the head's matrix is read once
    other_naive = other_macs * e_mac
    other_mem = other_naive + e_mem * other_weights
    pj = 1e-12
    return {
        "steps": T, "layers": rows,
        "in_rate": sum(r["in_rate"] for r in rows) / len(rows),
        "hidden_rate": sum(r["hidden_rate"] for r in rows) / len(rows),
        "spikes_per_token": tot["spikes"], "synops_per_token": tot["synops"],
        "macs_per_token_dense_ffn": tot["macs_dense"],
        "synops_over_macs": tot["synops"] / tot["macs_dense"],
        "ffn_energy_j": {"naive": {"spiking": tot["naive_spiking"] * pj, "dense": tot["naive_dense"] * pj},
                         "memory": {"spiking": tot["memory_spiking"] * pj, "dense": tot["memory_dense"] * pj}},
        "model_energy_j": {"naive": {"spiking": (tot["naive_spiking"] + other_naive) * pj,
                                     "dense": (tot["naive_dense"] + other_naive) * pj},
                           "memory": {"spiking": (tot["memory_spiking"] + other_mem) * pj,
                                      "dense": (tot["memory_dense"] + other_mem) * pj}},
        "ffn_ratio": {"naive": tot["naive_spiking"] / tot["naive_dense"],
                      "memory": tot["memory_spiking"] / tot["memory_dense"]},
        "model_ratio": {k: (tot[f"{k}_spiking"] + o) / (tot[f"{k}_dense"] + o)
                        for k, o in (("naive", other_naive), ("memory", other_mem))},
        "constants_pj": {"mac": e_mac, "ac": e_ac, "memory_access": e_mem},
    }


def spike_counts(spikes: torch.Tensor) -> dict[str, float]:
    """Total spikes and the mean firing rate (spikes per neuron per step) of (T, ...) spikes."""
    total = float(spikes.sum())
    return {"spikes": total, "rate": total / spikes.numel() if spikes.numel() else 0.0}
