"""Data-parallel training over processes: torchrun, then DistributedDataParallel or FSDP2
(``fully_shard``), checkpoints through torch.distributed.checkpoint (DCP).

    torchrun --nproc-per-node N -m keenlm train ...      (or: keenlm train --nproc N ...)

``train.parallel``: ``none`` (one process), ``ddp`` (every rank holds the model; gradients are
averaged), ``fsdp`` (FSDP2: parameters, gradients and optimizer state sharded per transformer
block; mixed precision on GPUs), ``auto`` (``ddp`` under torchrun with more than one process,
else ``none``). gloo on CPUs, NCCL on GPUs.

What makes N processes train the same model as one:

- **Data.** ``train.batch_size`` is the global batch. The batch of micro-step i is the same pure
  function of (seed, i) as in one process; rank r takes rows [r B/N, (r+1) B/N). Each rank's loss
  is the mean over its rows, and the averaged gradient is the gradient of the global mean.
- **The step.** ``LossModule`` is the training forward pass as one module (hidden states, then
  the LM-head loss), so DDP's and FSDP's hooks run around all of it; gradient accumulation skips
  DDP's all-reduce until the last micro-batch. Parts whose statistics span the batch reduce them
  over the ranks themselves (keenlm.model.moe: the load-balancing loss and bias balancing use the
  global expert counts).
- **Decisions.** A time budget, Ctrl-C and the schedule's length are decided on rank 0 and
  broadcast, so every rank runs the same steps.
- **Only rank 0 talks:** the progress bar, metrics.jsonl, the ledger (tokens and FLOPs of every
  rank), the run files. Every rank evaluates (FSDP needs every rank in a forward pass).
- **Checkpoints** (``save`` / ``load``): DCP, each rank writing its part, into a temporary folder
  that rank 0 renames to ``step-N`` and points ``latest`` at only after every rank finished.
  DCP reshards on load, so a checkpoint written by N ranks resumes on M, and a one-process run
  (``none``) reads it too; a one-process checkpoint resumes under N ranks.

Refused with a one-line reason: Muon under FSDP (it orthogonalizes whole matrices, FSDP shards
them), selective backprop (its rows are chosen across the whole batch), ``torch.compile``, MoE
token dropping (``capacity_factor`` > 0 decides over the whole batch), a global batch the ranks
cannot split evenly.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from keenlm import runs

MODES = ("none", "ddp", "fsdp", "auto")


@dataclasses.dataclass
class Dist:
    """This process's place in the job (rank 0 of 1 without torchrun)."""
    mode: str = "none"
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.mode != "none"

    def shard(self, x: torch.Tensor, y: torch.Tensor):
        """This rank's rows of a global batch."""
        if not self.active:
            return x, y
        n = x.shape[0] // self.world
        return x[self.rank * n:(self.rank + 1) * n], y[self.rank * n:(self.rank + 1) * n]

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over the ranks."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def decide(self, value):
        """Rank 0's value on every rank (a stop flag, a planned step count)."""
        if not self.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    @contextlib.contextmanager
    def rank0_first(self):
        """Rank 0 runs the block (e.g. building a token cache) before the others do."""
        if self.active and not self.main:
            dist.barrier()
        yield
        if self.active and self.main:
            dist.barrier()


def setup(parallel: str, device: torch.device, timeout_s: float = 60.0) -> Dist:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*)."""
    if parallel not in MODES:
        raise ValueError(f"train.parallel={parallel!r}: one of {' | '.join(MODES)}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    under_torchrun = "RANK" in os.environ and "MASTER_ADDR" in os.environ
    mode = ("ddp" if world > 1 else "none") if parallel == "auto" else parallel
    if mode == "none":
        if world > 1:
            raise ValueError(f"train.parallel=none, but torchrun started {world} processes: "
                             "use ddp, fsdp or auto")
        return Dist()
    if not under_torchrun:
        raise ValueError(f"train.parallel={mode} needs torchrun: keenlm train --nproc N ..., "
                         "or torchrun --nproc-per-node N -m keenlm train ...")
    # on GPUs, NCCL for CUDA tensors and gloo beside it for the few CPU ones (flags, counts)
    backend = "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    d = Dist(mode, dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(d.local_rank)
    return d


def check(d: Dist, cfg) -> None:
    """Refuse what this data parallelism cannot do exactly, with the reason."""
    if not d.active:
        return
    t = cfg.train
    if t.batch_size % d.world:
        raise ValueError(f"train.batch_size={t.batch_size} is the global batch: it must split "
                         f"evenly over {d.world} ranks")
    if d.mode == "fsdp" and t.optim.name == "muon":
        raise ValueError("train.optim.name=muon with train.parallel=fsdp: Muon orthogonalizes "
                         "whole matrices and FSDP shards them; use ddp, or adamw")
    if t.select.method != "none":
        raise ValueError("train.select with train.parallel: selective backprop ranks rows "
                         "across the whole batch; not supported across ranks")
    if t.runtime.compile:
        raise ValueError("train.runtime.compile with train.parallel: not supported yet")
    if cfg.model.ffn == "moe" and cfg.model.moe.capacity_factor > 0:
        raise ValueError("model.moe.capacity_factor > 0 with train.parallel: token dropping is "
                         "decided over the whole batch; use 0 (dropless)")


class LossModule(nn.Module):
    """The training forward pass as one module: the model's hidden states, then the loss of its
    LM head (keenlm.model.loss). DDP and FSDP2 wrap this module, so their hooks see the head."""

    def __init__(self, model: nn.Module, loss_fn, amp, compile: bool = False):
        super().__init__()
        self.model, self.loss_fn, self.amp = model, loss_fn, amp
        # through the model's __call__, so that hooks on it (FSDP's all-gather) run
        self.hidden = torch.compile(model.hidden_states) if compile else \
            (lambda x: self.model(x, hidden=True))

    def forward(self, x, y, weights=None):
        with torch.autocast(x.device.type, dtype=self.amp, enabled=self.amp is not None):
            h = self.hidden(x)
        B, T = y.shape
        return self.loss_fn(h.reshape(B * T, -1), self.model.lm_head.weight, y.reshape(-1),
                            None if weights is None else weights.reshape(-1))


def wrap(d: Dist, module: LossModule) -> nn.Module:
    """``module`` under DDP or FSDP2 (each transformer block sharded on its own, then the
    rest); itself when not distributed. FSDP2 changes the model's parameters in place (into
    DTensor shards): build the optimizer after this."""
    if d.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        device_ids = [d.local_rank] if next(module.parameters()).is_cuda else None
        # every parameter gets a gradient each step (MoE experts no token chose: a zero one,
        # keenlm.model.moe), so DDP's buckets fill the same way on every rank
        return DDP(module, device_ids=device_ids)
    if d.mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        kw = {}
        if next(module.parameters()).is_cuda:
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                   reduce_dtype=torch.float32)
        for block in module.model.layers:
            fully_shard(block, **kw)
        # the model is the root: its own parameters (embedding, final norm, head) stay gathered
        # from the forward pass to the backward, since the loss reads the head outside it
        fully_shard(module.model, reshard_after_forward=False, **kw)
        return module
    return module


def no_sync(d: Dist, wrapped: nn.Module, last: bool):
    """DDP: skip the gradient all-reduce on every micro-batch but the last of a step."""
    if d.mode == "ddp" and not last:
        return wrapped.no_sync()
    return contextlib.nullcontext()


# ------------------------------------------------------------------------------ checkpoints
#
# DCP with its safetensors storage (HuggingFaceStorageWriter/Reader): every rank writes its own
# shard files, each tensor's place in the whole recorded as JSON in the file's header. Nothing is
# pickled (DCP's default format pickles its metadata, and loading must not run code from a
# file). The optimizer's tensors go in flat, "optim/<parameter>/<name>"; its hyper-parameters
# (floats) go in trainer_state.pt, which torch.load reads with weights_only.


def _flat(msd: dict, osd: dict) -> dict[str, torch.Tensor]:
    flat = {f"model/{k}": v for k, v in msd.items()}
    for fqn, st in osd.get("state", {}).items():
        for key, v in st.items():
            if not torch.is_tensor(v):
                raise TypeError(f"optimizer state {fqn}.{key} is not a tensor ({type(v).__name__})")
            flat[f"optim/{fqn}/{key}"] = v
    return runs.distinct_tensors(flat)


def save(d: Dist, run_dir: Path, step: int, model: nn.Module, opt, trainer_state: dict,
         keep: int) -> Path:
    """Every rank writes its part of the model and optimizer; rank 0 writes the rest of the
    trainer state, then publishes the folder and moves ``latest`` once all have finished."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.checkpoint.state_dict import get_state_dict

    ckdir = Path(run_dir) / "checkpoints"
    tmp = None
    if d.main:
        ckdir.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=ckdir, prefix=".tmp-")
    tmp = Path(d.decide(tmp))
    msd, osd = get_state_dict(model, opt)
    dcp.save(_flat(msd, osd), storage_writer=HuggingFaceStorageWriter(
        str(tmp / "dcp"), save_distributed=d.active))
    d.barrier()  # every rank's part is on disk
    final = ckdir / runs.step_dir(step)
    if d.main:
        groups = [{k: v for k, v in g.items() if k != "params"} for g in osd["param_groups"]]
        runs.publish_checkpoint(tmp, step, keep, lambda folder: torch.save(
            {**trainer_state, "optim_param_groups": groups}, folder / "trainer_state.pt"))
    d.barrier()
    return final


def load(ckpt: Path, model: nn.Module, opt) -> dict:
    """Model and optimizer from a DCP checkpoint written by any number of ranks (resharded to
    this job's; also in one process); returns the rest of the trainer state."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    state = runs.load_trainer_state(ckpt)
    msd, osd = get_state_dict(model, opt)  # allocates the optimizer's state when it has none
    flat = _flat(msd, osd)
    held = runs.read_dcp(ckpt, {k: v for k, v in flat.items() if k.startswith("model/")})
    # optimizer entries the checkpoint lacks (an MoE expert no token had chosen yet) stay empty
    runs.read_dcp(ckpt, {k: v for k, v in flat.items() if k.startswith("optim/") and k in held})
    missing = {k.split("/")[1] for k in flat if k.startswith("optim/") and k not in held}
    for g, saved in zip(osd["param_groups"], state.get("optim_param_groups", [])):
        g.update(saved)
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
    params = dict(model.named_parameters())
    for fqn in missing:
        opt.state.pop(params[fqn], None)
    return state


def load_full(ckpt: Path, model: nn.Module, opt, build_plain) -> dict:
    """A one-process checkpoint (model.safetensors, the optimizer keyed by position) into a
    DDP or FSDP job: read into a plain copy of the model and optimizer, then spread the full
    state over the ranks. ``build_plain() -> (model, optimizer)`` makes the plain copy."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                         set_state_dict)

    from keenlm.model import load_model_state

    plain, plain_opt = build_plain()
    load_model_state(plain, runs.load_model_state(ckpt))
    state = runs.load_trainer_state(ckpt)
    plain_opt.load_state_dict(state["optimizer"])
    msd, osd = get_state_dict(plain, plain_opt, options=StateDictOptions(full_state_dict=True))
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd,
                   options=StateDictOptions(full_state_dict=True))
    return state


# ------------------------------------------------------------------------------ sizing

def plan(model_cfg, world: int, mode: str, micro_batch: int, seq_len: int) -> dict:
    """Memory per rank and bytes each rank sends per optimizer step, on GPUs in bf16 autocast
    with fp32 weights and AdamW (the estimate ``keenlm info --plan`` prints).

    weights, gradients, Adam's two moments: 4 + 4 + 8 bytes per parameter; under FSDP2 a rank
    holds 1/world of them, plus two blocks' weights gathered in bf16 (the current one and the
    prefetched next) and one block's fp32 gradients before its reduce-scatter. Activations: 34
    bytes per token, layer and unit of width in 16-bit (Korthikanti et al. 2022, "Reducing
    Activation Recomputation in Large Transformer Models", with FlashAttention: no
    seq_len^2 term), for the rank's micro-batch. Communication (ring algorithms, per rank):
    DDP all-reduces fp32 gradients, 2 (W-1)/W x 4P; FSDP2 all-gathers bf16 weights in the
    forward and backward passes and reduce-scatters fp32 gradients, (W-1)/W x (2P + 2P + 4P)."""
    from keenlm.ledger import count_params
    from keenlm.model import build_model

    with torch.device("meta"):
        net = build_model(model_cfg)
    P = count_params(net)["total"]
    block = sum(p.numel() for p in net.layers[0].parameters())
    state = 16 * P
    acts = 34 * seq_len * micro_batch * model_cfg.d_model * model_cfg.n_layer
    share = (world - 1) / world
    if mode == "ddp":
        held, comm = state, share * 2 * 4 * P
    elif mode == "fsdp":
        held, comm = state / world + 2 * 2 * block + 4 * block, share * 8 * P
    else:
        raise ValueError(f"mode {mode!r}: ddp | fsdp")
    return {"params": P, "block_params": block, "state_bytes": held, "activation_bytes": acts,
            "total_bytes": held + acts, "comm_bytes": comm,
            "tokens_per_step": world * micro_batch * seq_len}


# ------------------------------------------------------------------------------ launching

def launch(nproc: int, argv: list[str]) -> int:
    """``keenlm train --nproc N ARGS``: torchrun runs ``keenlm train ARGS`` in N processes on
    this machine, each with cores / N threads; its exit status (torchrun names a failed rank).

    Ctrl-C: torchrun runs in a session of its own, so the terminal's signal reaches only this
    launcher, which passes one SIGINT on: torchrun hands it to every worker once, and they
    finish the step, save and exit. A second Ctrl-C ends torchrun (and its workers) at once."""
    import signal
    import subprocess
    import sys

    threads = max(1, (os.cpu_count() or 1) // nproc)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "keenlm.cli", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    asked = []

    def forward(signum, frame):
        proc.send_signal(signal.SIGINT if not asked else signal.SIGTERM)
        asked.append(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
        return 130 if asked else code  # interrupted (torchrun itself reports the signal as 1)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
