"""``keenlm spike RUN``: a model run as a spiking network at one or more time steps T: loss,
firing rates, synaptic operations and energy per token against the dense model
(keenlm.spiking.recipe); with one T, saved as a run folder or exported to NIR."""
from __future__ import annotations

import json

import keenlm
from keenlm.cli.options import add_model_source, int_list, model_path
from keenlm.config import SpikeConfig
from keenlm.spiking.nir import export_nir
from keenlm.spiking.recipe import save_spiking, spike_eval


def add_parser(sub, fmt):
    sp = sub.add_parser("spike", help="run a model as a spiking network: loss, firing rates, "
                        "synaptic operations and energy per token against the dense model",
                        formatter_class=fmt)
    add_model_source(sp)
    sp.add_argument("--steps", default="4,8,16", help="time steps T per token, comma-separated")
    sp.add_argument("--calibrate", type=int, default=8,
                    help="training batches for threshold balancing")
    sp.add_argument("--beta", type=float, default=None,
                    help="membrane leak per step (1: integrate-and-fire; default: 1, or a "
                         "spiking model's own)")
    sp.add_argument("--reset", default=None, choices=("subtract", "zero"),
                    help="after a spike: subtract the threshold, or reset to zero (NIR's neuron); "
                         "default: subtract, or a spiking model's own")
    sp.add_argument("--no-round", action="store_true",
                    help="no 1/(2T) bias: T steps give floor(T x) spikes instead of round(T x)")
    sp.add_argument("--percentile", type=float, default=99.9,
                    help="threshold balancing: percentile of |activation| per channel")
    sp.add_argument("--batches", type=int, default=20, help="validation batches")
    sp.add_argument("--batch-size", type=int, default=8, help="windows per batch")
    sp.add_argument("--seq-len", type=int, default=None, help="window length (default: the run's)")
    sp.add_argument("--out", help="save the spiking model as a run folder (one --steps value)")
    sp.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    sp.add_argument("--nir", help="export the spiking layers to this NIR file (needs --reset zero)")
    sp.add_argument("--json", action="store_true", help="print JSON")
    return sp


def run(args) -> int:
    steps = int_list(args.steps, "--steps")
    if (args.out or args.nir) and len(steps) != 1:
        raise ValueError("--out and --nir save one spiking model: give a single --steps value")
    km = keenlm.load(model_path(args))
    res = spike_eval(km, steps, _spike_config(args, km.config.model.spike, steps[0]),
                     calibrate=args.calibrate, batches=args.batches, batch_size=args.batch_size,
                     seq_len=args.seq_len, log=(lambda s: None) if args.json else print)
    net = res["models"][steps[0]]
    if args.out:
        print(f"wrote {save_spiking(km, net, args.out, overwrite=args.overwrite)}")
    if args.nir:
        print(f"wrote {export_nir(net, args.nir)}")
    if args.json:
        print(json.dumps({k: v for k, v in res.items() if k != "models"}, indent=2))
    return 0


def _spike_config(args, own: SpikeConfig, steps: int) -> SpikeConfig:
    """The neuron from the options; a spiking model keeps its own unless told otherwise."""
    return SpikeConfig(steps=steps, beta=own.beta if args.beta is None else args.beta,
                       reset=args.reset or own.reset, round=own.round and not args.no_round,
                       percentile=args.percentile, calibrate=args.calibrate)
