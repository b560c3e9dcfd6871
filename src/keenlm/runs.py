"""Run folders and crash-safe checkpoints.

A run is a folder:

    config.json          resolved RunConfig (every derived value filled in)
    env.json             git revision, package versions, machine, threads
    tokenizer/           tokenizer.json (+ keenlm_tokenizer.json)
    metrics.jsonl        one JSON object per logged step / evaluation
    ledger.json          parameters, FLOPs, tokens, wall time (keenlm.ledger)
    samples.txt          generated samples
    checkpoints/
        step-000100/     model.safetensors + trainer_state.pt (optimizer, RNG, step)
        latest           name of the newest complete checkpoint folder

A checkpoint is written into a temporary folder, flushed, and renamed; only then is ``latest``
replaced (itself by write-to-temp + ``os.replace``). A crash at any point leaves ``latest``
naming a complete checkpoint. Loading uses safetensors for weights and
``torch.load(weights_only=True)`` for trainer state: no code in a file is ever executed.

One writer per folder: a job that writes a run (training, RL, a sweep, a quantized model)
``hold``s it, an exclusive lock on ``.NAME.lock`` beside the folder (``flock``: the kernel
drops it when the holder's process ends, however it ends, so a killed job never leaves it
stuck); a second job on the same folder is refused with the holder's pid, host, job and start.
"""
from __future__ import annotations

import ctypes
import datetime
import errno
import fcntl
import glob
import json
import os
import platform
import re
import socket
import shutil
import subprocess
import sys
import tempfile
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from keenlm._version import __version__


def temp_sibling(final: Path) -> Path:
    """Where a write of ``final`` goes until it is renamed into place:
    ``.NAME.tmp-HOST-PID-RANDOM`` beside it, so that ``clear_stale`` can tell a killed writer's
    leftover (its process is gone) from a live one's."""
    return final.with_name(f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}-"
                           f"{uuid.uuid4().hex[:8]}")


def clear_stale(final: Path) -> None:
    """Remove the temporary siblings of ``final`` that writers on this host left when they were
    killed (a process that is gone); called before each new write of ``final``."""
    prefix = f".{final.name}.tmp-{socket.gethostname()}-"
    for p in final.parent.glob(glob.escape(prefix) + "*"):
        pid = p.name[len(prefix):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def atomic_write_bytes(path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clear_stale(path)
    tmp = temp_sibling(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def append_jsonl(path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a crash: ignore it
                continue
    return out


def git_revision() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True,
                               text=True, timeout=5)
        if rev.returncode:
            return "unknown"
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> dict:
    versions = {"keenlm": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
                "python": sys.version.split()[0]}
    for name in ("tokenizers", "safetensors", "transformers"):
        mod = sys.modules.get(name)
        if mod is not None:
            versions[name] = getattr(mod, "__version__", "?")
    return {"git": git_revision(), "versions": versions, "platform": platform.platform(),
            "machine": platform.machine(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "argv": sys.argv}


# ---------------------------------------------------------------------------------------------
# checkpoints


def step_dir(step: int) -> str:
    return f"step-{step:07d}"


def fsync_tree(folder: Path) -> None:
    """Every file under ``folder`` on disk (before a rename makes the folder visible)."""
    for f in Path(folder).rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (the previous one stays ``latest``)."""


def save_checkpoint(run_dir, step: int, model_state: dict, trainer_state: dict, keep: int = 2) -> Path:
    """Write model + trainer state for ``step`` atomically; keep the newest ``keep``."""
    ckdir = Path(run_dir) / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        save_file(model_state, str(tmp / "model.safetensors"))
        torch.save(trainer_state, tmp / "trainer_state.pt")
    return publish_checkpoint(Path(tempfile.mkdtemp(dir=ckdir, prefix=".tmp-")), step, keep, write)


def publish_checkpoint(tmp: Path, step: int, keep: int, write: Callable[[Path], None]) -> Path:
    """Finish the temporary folder ``tmp`` (inside checkpoints/) as the checkpoint of ``step``:
    ``write(tmp)`` adds the last files, everything goes to disk, one rename makes it
    ``step-N``, then ``latest`` points at it and checkpoints beyond the newest ``keep`` go. A
    failure removes ``tmp`` and leaves ``latest`` where it was."""
    ckdir = tmp.parent
    final = ckdir / step_dir(step)
    try:
        write(tmp)
        fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except (OSError, SafetensorError) as e:  # a full disk, a file-size limit, a lost folder
        # (safetensors reports its write errors as SafetensorError, not OSError)
        shutil.rmtree(tmp, ignore_errors=True)
        kept = latest_checkpoint(ckdir.parent)
        raise CheckpointWriteError(
            getattr(e, "errno", None) or errno.EIO,
            f"could not write checkpoint {final.name} in {ckdir}: {getattr(e, 'strerror', None) or e}; "
            + (f"{kept.name} stays the latest checkpoint" if kept else "no checkpoint was kept")
            + " -- free space and run again to resume") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(ckdir / "latest", final.name + "\n")
    prune(ckdir, keep, final.name)
    return final


def prune(ckdir: Path, keep: int, current: str) -> None:
    steps = sorted(p for p in ckdir.iterdir() if p.is_dir() and p.name.startswith("step-"))
    for p in steps[:-keep]:
        if p.name != current:
            shutil.rmtree(p, ignore_errors=True)
    for p in ckdir.glob(".tmp-*"):  # leftovers of an interrupted write
        shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(run_dir) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{pointer}: unreadable ({e})") from None
    if not re.fullmatch(r"step-\d{1,12}", name):  # never a path out of the folder
        raise ValueError(f"{pointer} names {name[:80]!r}, not a checkpoint (step-NNNNNNN)")
    path = pointer.parent / name
    if not (path / "model.safetensors").exists() and not is_dcp(path):
        raise FileNotFoundError(f"{pointer} names {path.name}, which has no model.safetensors "
                                "(nor a distributed checkpoint, dcp/)")
    return path


def is_dcp(ckpt: Path) -> bool:
    """A checkpoint of a distributed run (keenlm.train.distributed): DCP shards in dcp/."""
    return (Path(ckpt) / "dcp").is_dir()


def distinct_tensors(flat: dict) -> dict:
    """``flat`` without entries that share memory with an earlier one (a tied LM head and its
    embedding): safetensors stores each tensor once, and loading the first fills both."""
    seen, out = set(), {}
    for k, v in flat.items():
        local = v.to_local() if hasattr(v, "to_local") else v
        key = (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(local.shape))
        if local.numel() and key in seen:
            continue
        seen.add(key)
        out[k] = v
    return out


def read_dcp(ckpt: Path, flat: dict, partial: bool = False) -> set[str]:
    """Fill ``flat``'s tensors in place (this rank's shards of them, when they are DTensors)
    from a distributed checkpoint, resharding as needed; returns the keys the checkpoint holds.
    DCP's safetensors storage: JSON metadata in each file's header, nothing unpickled."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    reader = HuggingFaceStorageReader(str(Path(ckpt) / "dcp"))
    try:
        held = set(reader.read_metadata().state_dict_metadata)
        with warnings.catch_warnings():  # "... assuming ... a single process": that is the intent
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(flat, storage_reader=reader,
                     planner=DefaultLoadPlanner(allow_partial_load=partial))
    except Exception as e:  # noqa: BLE001 - safetensors and DCP raise many kinds for damage
        raise ValueError(f"cannot read the distributed checkpoint {ckpt}: {e}") from None
    return held


def load_model_state(ckpt: Path) -> dict:
    f = Path(ckpt) / "model.safetensors"
    try:
        return load_file(str(f))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"cannot read {f}: {e}") from None


def checkpoint_shapes(ckpt: Path) -> dict[str, tuple[int, ...]]:
    """Each weight's shape, from the file's header alone (safetensors, or a distributed
    checkpoint's metadata): what a loader checks a config against before building a model."""
    if is_dcp(ckpt):
        from torch.distributed.checkpoint import HuggingFaceStorageReader

        try:
            meta = HuggingFaceStorageReader(str(Path(ckpt) / "dcp")).read_metadata()
        except Exception as e:  # noqa: BLE001 - as read_dcp
            raise ValueError(f"cannot read the distributed checkpoint {ckpt}: {e}") from None
        return {k.removeprefix("model/"): tuple(getattr(m, "size", ()))
                for k, m in meta.state_dict_metadata.items() if k.startswith("model/")}
    f = Path(ckpt) / "model.safetensors"
    try:
        with safe_open(str(f), framework="pt") as st:
            return {k: tuple(st.get_slice(k).get_shape()) for k in st.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"cannot read {f}: {e}") from None


def load_trainer_state(ckpt: Path) -> dict:
    f = Path(ckpt) / "trainer_state.pt"
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a corrupt file
        raise ValueError(f"cannot read {f}: {e}") from None


def default_cache_dir(cfg_value: str = "") -> Path:
    """The cache folder: ``cfg_value`` if set, else ``$KEENLM_CACHE``, else ``~/.cache/keenlm``."""
    value = cfg_value or os.environ.get("KEENLM_CACHE", "") or "~/.cache/keenlm"
    return Path(value).expanduser()


@contextmanager
def atomic_folder(final: Path, is_valid: Callable[[Path], bool] = lambda p: False,
                  replace: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder; on success move it to ``final`` in one rename.

    If ``final`` already exists when we are done, it is kept when ``is_valid(final)`` (another
    writer won a race) unless ``replace``; otherwise it is swapped out for ours.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clear_stale(final)
    tmp = temp_sibling(final)
    tmp.mkdir()
    try:
        yield tmp
        _publish(tmp, final, is_valid, replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a no-op once the rename has happened


def _publish(tmp: Path, final: Path, is_valid: Callable[[Path], bool], replace: bool) -> None:
    try:
        os.rename(tmp, final)
        return
    except OSError:
        if not final.exists():
            raise
    if not replace and is_valid(final):
        return
    if _exchange(tmp, final):  # one step: at no moment is there nothing under the final name
        shutil.rmtree(tmp, ignore_errors=True)  # now the old folder
        return
    trash = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(final, trash)
    except FileNotFoundError:
        pass  # someone else moved it away already
    try:
        os.rename(tmp, final)
    except OSError:
        if not is_valid(final):  # a third writer put a good copy there meanwhile: fine
            raise
    shutil.rmtree(trash, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux ``renameat2`` with RENAME_EXCHANGE); False where
    the system or the filesystem has no such call (then the caller renames twice)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


class FolderBusy(RuntimeError):
    """Another job holds the folder (``hold``)."""


def lock_path(folder: Path) -> Path:
    folder = Path(folder).absolute()
    return folder.parent / f".{folder.name}.lock"


@contextmanager
def hold(folder, job: str) -> Iterator[None]:
    """Hold ``folder`` for one writing ``job`` (see the module docstring); FolderBusy when
    another process holds it. Released when the block ends or the process dies."""
    path = lock_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            who = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except (ValueError, UnicodeDecodeError):
            who = {}
        os.close(fd)
        holder = (f"pid {who.get('pid', '?')} on {who.get('host', '?')} ({who.get('job', '?')}, "
                  f"since {who.get('since', '?')})")
        raise FolderBusy(f"{folder} is in use by {holder}: wait for it, stop it, or use another "
                         "output folder") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "job": job,
                                  "since": datetime.datetime.now().isoformat(timespec="seconds")}
                                 ).encode(), 0)
        yield
    finally:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
