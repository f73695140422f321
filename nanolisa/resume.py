"""Resume checkpoints: everything a bit-exact continuation of an interrupted run needs, verified before use.

A resume checkpoint is a directory `--out/checkpoints/step-NNNNNNN/` (not to be confused with the Hugging
Face model directory a finished run writes, nor with activation checkpointing). It holds safetensors and
JSON only; no pickle is ever written or read:

  *.safetensors           the trainable weights (all weights for full and LISA; the adapters for LoRA) and
                          the AdamW state, written by torch.distributed.checkpoint (DCP) in safetensors
                          files: with several ranks each rank writes its own shard, in parallel
  rng-rank<R>.safetensors each rank's torch CPU (and CUDA) generator state
  trainer_state.json      the step, the run's settings, the world size, the data position, LISA's sampler,
                          which parameters have AdamW state, the fp16 loss scaler and Python's RNG
  metrics.jsonl           the run's metrics up to this step (a resumed run's log starts from these rows)
  manifest.json           every other file's size and CRC-32, written last

It is written to a temporary directory (`.tmp-step-*`) and renamed into place once every rank has
finished, so a run killed at any moment never leaves a checkpoint that --resume would pick.

Before a checkpoint is used it is verified (`check_checkpoint`), and a damaged one is skipped, with a
one-line notice, for the next older one: a full disk, a killed copy or a flipped bit must never give a
traceback, nor a model that differs from the uninterrupted run with exit status 0. Verified are
  1. the manifest: the same files, each of its size and CRC-32 (the ranks share the reading);
  2. every field of trainer_state.json in its range (the step below the run's total and equal to the
     directory's, the data position equal to step x grad_accum batches, LISA's blocks within the model);
  3. every tensor's name, dtype and shape against the live model and optimizer, and that the shards of
     all ranks together cover each tensor exactly;
  4. each rank's RNG state.
2-4 catch what the manifest cannot: a checkpoint damaged before its manifest was written, or edited with
its manifest. Settings that differ from this run's (another --lr, another process count, other data) are
not damage: they refuse the resume in one line. Only the newest KEEP checkpoints are kept; a finished run
removes them all.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import struct
import sys
import warnings
import zlib
from contextlib import contextmanager

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nanolisa.errors import UserError
from nanolisa.files import new_staging_dir, read_json, remove_in_background, umask_mode, write_failure, write_json
from nanolisa.parallel import World, barrier, broadcast, gather
from nanolisa.pretrained import STORED_DTYPES
from nanolisa.signals import is_lost_rank
from nanolisa.train_config import RESUMABLE_CHANGES, TrainConfig

CHECKPOINTS = "checkpoints"  # under --out
KEEP = 2
STATE = "trainer_state.json"
MANIFEST = "manifest.json"
METRICS = "metrics.jsonl"
STATE_FIELDS = ("step", "config", "world_size", "data", "lisa", "adamw", "python_rng", "scaler")


def checkpoint_dirs(out: str) -> list[str]:
    """The completed resume checkpoints in --out, oldest first (temporary directories are not listed)."""
    root = os.path.join(out, CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if n.startswith("step-") and
                   os.path.isfile(os.path.join(root, n, STATE)))
    return [os.path.join(root, n) for n in names]


def _tensors(model, optimizer, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """What DCP saves and loads in place: weights, and the AdamW state of the parameters that have one.
    Detached views share storage with the live tensors, so loading writes straight into the model."""
    names = {p: n for n, p in model.named_parameters()}
    out = {f"weight/{n}": p.detach() for p, n in names.items() if p.requires_grad or cfg.method != "lora"}
    for p, state in optimizer.state.items():
        out.update({f"adamw/{names[p]}/{k}": v for k, v in state.items()})
    return out


# ----------------------------------------------------------------------------------------------------------
# Writing


def save_checkpoint(r, step: int, metrics: list[dict] | None) -> str:
    """Write the resume checkpoint of `step` (every rank calls this together); returns its directory.
    `r` is the trainer's Run (model, optimizer, lisa, batches, scaler, cfg, world); `metrics` are the
    run's metrics rows so far (rank 0)."""
    import torch.distributed.checkpoint as dcp  # a second to import: only runs that checkpoint pay for it
    from torch.distributed.checkpoint.api import CheckpointException

    from nanolisa.resume_writer import StreamingHFWriter
    cfg, world = r.cfg, r.world
    final = os.path.join(cfg.out, CHECKPOINTS, f"step-{step:07d}")
    names = {p: n for n, p in r.model.named_parameters()}
    tmp = broadcast(new_staging_dir(os.path.join(cfg.out, CHECKPOINTS), ".tmp-step-") if world.is_main else None,
                    world)
    try:
        with _quiet_single_process():
            dcp.save(_tensors(r.model, r.optimizer, cfg), no_dist=not world.distributed,
                     storage_writer=StreamingHFWriter(tmp, save_distributed=world.distributed))
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():  # LoRA dropout on a GPU draws from the CUDA generator
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, os.path.join(tmp, f"rng-rank{world.rank}.safetensors"))
        umask_mode(os.path.join(tmp, f"rng-rank{world.rank}.safetensors"))
        if world.is_main:
            state = {"step": step, "config": dataclasses.asdict(cfg), "world_size": world.world_size,
                     "data": r.batches.state_dict(), "lisa": r.lisa.state_dict() if r.lisa else None,
                     "adamw": sorted(names[p] for p in r.optimizer.state), "python_rng": _to_lists(random.getstate()),
                     "scaler": r.scaler.state_dict() if r.scaler else None}
            write_json(os.path.join(tmp, STATE), state, indent=None)
            with open(os.path.join(tmp, METRICS), "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in metrics or [])
        barrier(world)  # every rank's files are complete
        _write_manifest(tmp, world)
        if world.is_main:  # the rename makes the checkpoint visible, complete
            if os.path.exists(final):
                remove_in_background(final)
            os.replace(tmp, final)
            for old in checkpoint_dirs(cfg.out)[:-KEEP]:
                remove_in_background(old)  # no rank waits for the file system
    except BaseException as e:
        if world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (OSError, CheckpointException, SafetensorError)) and not is_lost_rank(e):
            raise write_failure(f"the checkpoint {final}", e) from None
        raise
    barrier(world)
    return final


def _crc32(path: str) -> str:
    """CRC-32 of a file, read in 16 MiB pieces: zlib's, the fastest checksum of the standard library (about
    1 GB/s), and enough to notice damage (it is not meant to resist deliberate edits)."""
    crc = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _my_share(directory: str, world: World) -> dict[str, dict]:
    """Size and CRC-32 of this rank's share of the files in directory (file i goes to rank i mod N), so
    that the ranks read a large checkpoint in parallel."""
    files = sorted(f for f in os.listdir(directory) if f != MANIFEST)
    mine = files[world.rank::world.world_size]
    return {f: {"bytes": os.path.getsize(os.path.join(directory, f)), "crc32": _crc32(os.path.join(directory, f))}
            for f in mine}


def _write_manifest(directory: str, world: World) -> None:
    files: dict[str, dict] = {}
    for share in gather(_my_share(directory, world), world):
        files.update(share)
    if world.is_main:
        write_json(os.path.join(directory, MANIFEST), {"files": files})


def remove_checkpoints(out: str) -> None:
    """A finished run's checkpoints have done their job (removed in the background: see files.py)."""
    remove_in_background(os.path.join(out, CHECKPOINTS))


# ----------------------------------------------------------------------------------------------------------
# Choosing the checkpoint to resume from


def resume_candidates(cfg: TrainConfig, world: World) -> list[str]:
    """The checkpoints --resume may continue from, newest first ([] for a fresh run). Every rank calls this
    before the model is loaded: it refuses (one line, every rank) to continue without --resume, with
    another number of processes or with other settings, as the newest readable trainer_state.json says."""
    ckpts = checkpoint_dirs(cfg.out)[::-1]
    if not ckpts:
        return []
    if not cfg.resume:
        raise UserError(f"{cfg.out} holds an unfinished run's checkpoints: pass --resume to continue it, "
                        f"or choose another --out")
    for path in ckpts:
        try:  # trainer_state.json as it was written (the rest is verified once the model is loaded)
            listed = read_json(os.path.join(path, MANIFEST))["files"][STATE]["crc32"]
            state = read_json(os.path.join(path, STATE))
            saved, ranks = dict(state["config"]), state["world_size"]
        except (UserError, KeyError, TypeError, ValueError):
            continue  # damaged: resume() says so when it comes to it
        if listed != _crc32(os.path.join(path, STATE)):
            continue
        if ranks != world.world_size:
            raise UserError(f"{path} was written by {ranks} process(es), this run has {world.world_size}: resume "
                            f"with the same number of processes (torchrun --nproc_per_node / --nnodes), so that "
                            f"the global batches stay the same")
        now = dataclasses.asdict(cfg)
        diff = [k for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k]]
        if diff:
            k = diff[0]
            raise UserError(f"{cfg.out} holds a run with different settings ({k}: {saved.get(k)!r} there, "
                            f"{now[k]!r} now); use the same flags to resume, or another --out")
        break
    return ckpts


def resume(r, candidates: list[str]) -> tuple[str, int, list[dict]]:
    """Load the newest intact checkpoint of `candidates` into the run (every rank together); returns its
    path, its step and its metrics rows. A damaged one is skipped with a notice; none intact is one line."""
    from torch.distributed.checkpoint.api import CheckpointException  # (see save_checkpoint)
    for path in candidates:
        problem = check_checkpoint(path, r)
        if problem is None:
            try:
                step, rows = load_checkpoint(path, r)
            except (CheckpointException, SafetensorError, OSError, RuntimeError, ValueError, KeyError) as e:
                problem = f"it could not be loaded ({str(e).strip().splitlines()[-1][:200]})"
            problem = next((p for p in gather(problem, r.world) if p is not None), None)  # loaded on every rank?
            if problem is None:
                return path, step, rows
        if r.world.is_main:
            print(f"note: skipping the checkpoint {path}: {problem}", file=sys.stderr)
    raise UserError(f"{r.cfg.out}: no intact checkpoint to resume from ({len(candidates)} damaged, see the "
                    f"notes above); start a new run in another --out")


def load_checkpoint(path: str, r) -> tuple[int, list[dict]]:
    """Restore everything save_checkpoint wrote into the live objects (check_checkpoint passed, so LISA's
    blocks and the AdamW state are in place); returns the step to continue from and the metrics rows."""
    import torch.distributed.checkpoint as dcp  # (see save_checkpoint)
    state = read_json(os.path.join(path, STATE))
    r.optimizer.state.clear()
    params = dict(r.model.named_parameters())
    for n in state["adamw"]:  # empty AdamW state of the right shapes (and shards), filled by dcp.load
        p = params[n]
        r.optimizer.state[p] = {"step": torch.zeros((), dtype=torch.float32), "exp_avg": torch.zeros_like(p),
                                "exp_avg_sq": torch.zeros_like(p)}
    with torch.no_grad(), _quiet_single_process():
        dcp.load(_tensors(r.model, r.optimizer, r.cfg), no_dist=not r.world.distributed,
                 storage_reader=dcp.HuggingFaceStorageReader(path))
    r.batches.load_state_dict(state["data"])
    rng = load_file(os.path.join(path, f"rng-rank{r.world.rank}.safetensors"))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    random.setstate(_to_tuples(state["python_rng"]))
    if r.scaler:
        r.scaler.load_state_dict(state["scaler"])
    with open(os.path.join(path, METRICS)) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return int(state["step"]), rows


# ----------------------------------------------------------------------------------------------------------
# Verifying a checkpoint before it is used


def check_checkpoint(path: str, r) -> str | None:
    """What is wrong with a checkpoint, or None if it is intact (every rank calls this together, and all get
    the same answer). LISA's state is applied on the way (the AdamW state must belong to its active blocks):
    a checkpoint that fails later leaves it for the next candidate, which sets it again."""
    problem = _check_manifest(path, r.world)
    if problem is None:
        try:
            problem = _check_state(path, r) or _check_rng(path, r.world)
        except (UserError, OSError, KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            problem = f"unreadable {STATE} ({e})"
    return next((p for p in gather(problem, r.world) if p is not None), None)


def _check_manifest(path: str, world: World) -> str | None:
    """The files are those manifest.json lists, each of its size and CRC-32 (each rank reads its share)."""
    try:
        listed = read_json(os.path.join(path, MANIFEST))["files"]
        present = sorted(f for f in os.listdir(path) if f != MANIFEST)
    except (UserError, OSError, KeyError, TypeError) as e:
        return f"no readable {MANIFEST} ({e})"
    if not isinstance(listed, dict):
        return f"{MANIFEST} does not list files"
    if sorted(listed) != present:
        missing, extra = sorted(set(listed) - set(present)), sorted(set(present) - set(listed))
        return f"its files differ from {MANIFEST}" + (f": {missing[0]} is missing" if missing else
                                                      f": {extra[0]} is not listed" if extra else "")
    try:
        for f, seen in _my_share(path, world).items():
            if seen != listed[f]:
                return f"{f} is damaged (size and CRC-32 differ from {MANIFEST})"
    except OSError as e:
        return f"unreadable ({e})"
    return None


def _int(v) -> bool:
    return type(v) is int


def _check_state(path: str, r) -> str | None:
    """Every field of trainer_state.json in its range, then every tensor against the model."""
    state = read_json(os.path.join(path, STATE))
    missing = [k for k in STATE_FIELDS if k not in state]
    if missing:
        return f"{STATE} lacks {missing}"
    step = state["step"]
    named = int(os.path.basename(path).removeprefix("step-"))
    if not _int(step) or not 0 < step < r.total or step != named:
        return f"its step {step!r} is not a step of this {r.total}-step run, or not the {named} of its name"
    problem = _check_data(state["data"], step, r) or _check_rngs(state, r)
    if problem:
        return problem
    if r.lisa:
        problem = _check_lisa(state["lisa"], step, r)
        if problem:
            return problem
        r.lisa.load_state_dict(state["lisa"], r.optimizer)  # the blocks the AdamW state must belong to
    params = dict(r.model.named_parameters())
    adamw = state["adamw"]
    if not isinstance(adamw, list) or not all(isinstance(n, str) for n in adamw):
        return "its AdamW state list is not a list of names"
    unknown = [n for n in adamw if n not in params or not params[n].requires_grad]
    if unknown:
        return f"it holds AdamW state for {unknown[0]}, which is not a trainable parameter of this run"
    return _check_tensors(path, adamw, r)


def _check_data(data, step: int, r) -> str | None:
    """The data position: step x grad_accum batches read since the start (epochs included)."""
    if not isinstance(data, dict) or not all(_int(data.get(k)) and data[k] >= 0 for k in ("epoch", "batch")):
        return f"its data position {data!r} is not a (epoch, batch) pair"
    read, epoch = 0, 0
    if not r.cfg.pack:  # every epoch has len(batches) batches (packed epochs differ a little: count them)
        read, epoch = data["epoch"] * len(r.batches), data["epoch"]
    while epoch < data["epoch"] and read <= step * r.cfg.grad_accum:
        read += len(r.batches._plan(epoch))
        epoch += 1
    if read + data["batch"] != step * r.cfg.grad_accum:
        return (f"its data position (epoch {data['epoch']}, batch {data['batch']}) is not where step {step} "
                f"leaves the data")
    return None


def _check_rngs(state: dict, r) -> str | None:
    """Python's RNG state and the fp16 loss scaler's, as the objects that take them accept them."""
    try:
        random.Random().setstate(_to_tuples(state["python_rng"]))
    except (TypeError, ValueError, OverflowError):
        return "its Python RNG state is malformed"
    scaler = state["scaler"]
    if (r.scaler is None) != (scaler is None):
        return "its fp16 loss-scaler state does not fit this run's --dtype"
    if scaler is not None:
        ok = isinstance(scaler, dict) and isinstance(scaler.get("scale"), float) and \
            math.isfinite(scaler["scale"]) and scaler["scale"] > 0 and _int(scaler.get("_growth_tracker")) and \
            scaler["_growth_tracker"] >= 0
        if not ok:
            return f"its fp16 loss-scaler state {scaler!r} is out of range"
    return None


def _check_lisa(lisa, step: int, r) -> str | None:
    """LISA's sampler: its seed, its RNG, and active blocks that exist in this model (as many as
    --lisa-layers), at every recorded switch up to this step."""
    n_blocks = len(r.lisa.model.blocks)

    def blocks_ok(a) -> bool:
        return isinstance(a, list) and len(a) == r.lisa.n_layers and len(set(a)) == len(a) and \
            all(_int(i) and 0 <= i < n_blocks for i in a)
    try:
        ok = lisa["seed"] == r.cfg.seed and blocks_ok(lisa["active"]) and isinstance(lisa["history"], list) and \
            all(_int(s) and 0 <= s <= step and blocks_ok(a) for s, a in lisa["history"])
        version, internal, gauss = lisa["rng_state"]
        random.Random().setstate((version, tuple(internal), gauss))
    except (KeyError, TypeError, ValueError, OverflowError):
        ok = False
    return None if ok else "its LISA state is malformed or names blocks this model does not have"


def _check_rng(path: str, world: World) -> str | None:
    """One RNG file per rank, and this rank's holds a torch generator state: a byte tensor of torch's size."""
    rngs = sorted(f for f in os.listdir(path) if f.startswith("rng-"))
    if rngs != sorted(f"rng-rank{r}.safetensors" for r in range(world.world_size)):
        return f"its RNG files {rngs} are not those of {world.world_size} process(es)"
    f = os.path.join(path, f"rng-rank{world.rank}.safetensors")
    try:
        rng = load_file(f)
    except (OSError, SafetensorError) as e:
        return f"rng-rank{world.rank}.safetensors is unreadable ({e})"
    t, want = rng.get("torch"), torch.get_rng_state()
    if t is None or t.dtype != want.dtype or t.shape != want.shape:
        return f"rng-rank{world.rank}.safetensors does not hold a torch generator state"
    return None


def _headers(path: str) -> dict[str, list[tuple[str, list[int], list[int]]]]:
    """name -> [(dtype, shape, offset)] of every piece in the checkpoint's weight files (offset: where the
    piece starts in the whole tensor, from DCP's sharding info). A file must be as long as its header says."""
    pieces: dict[str, list] = {}
    for name in sorted(os.listdir(path)):
        if not name.endswith(".safetensors") or name.startswith("rng-"):
            continue
        with open(os.path.join(path, name), "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
            size = f.seek(0, os.SEEK_END)
        sharding = json.loads(header.pop("__metadata__", {}).get("DCP_SHARDING_INFO", "{}"))
        end = 8 + n + max([v["data_offsets"][1] for v in header.values()] or [0])
        if size != end:
            raise ValueError(f"{name} is {size} bytes, its header says {end}")
        for key, v in header.items():
            offset = sharding[key]["saved_offsets"] if key in sharding else [0] * len(v["shape"])
            pieces.setdefault(key, []).append((v["dtype"], v["shape"], offset))
    return pieces


def _check_tensors(path: str, adamw: list[str], r) -> str | None:
    """Every tensor the model and optimizer will load is in the files, with its dtype, and the pieces of
    all ranks cover its whole shape (a missing rank's shard, a transposed or renamed tensor are found)."""
    params = dict(r.model.named_parameters())
    want = {f"weight/{n}": (tuple(p.shape), p.dtype) for n, p in params.items()
            if p.requires_grad or r.cfg.method != "lora"}
    for n in adamw:
        moment = (tuple(params[n].shape), params[n].dtype)
        want |= {f"adamw/{n}/step": ((), torch.float32), f"adamw/{n}/exp_avg": moment, f"adamw/{n}/exp_avg_sq": moment}
    try:
        pieces = _headers(path)
    except (OSError, struct.error, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        return f"a weight file is not what its header says ({e})"
    if set(pieces) != set(want):
        odd = sorted(set(pieces) ^ set(want))[0]
        return f"tensor {odd} is {'not expected' if odd in pieces else 'missing'}"
    for key, (shape, dtype) in want.items():
        covered = 0
        for st_dtype, piece, offset in pieces[key]:
            fits = len(piece) == len(offset) == len(shape) and \
                all(_int(a) and _int(b) and 0 <= b and a + b <= s for a, b, s in zip(piece, offset, shape))
            if STORED_DTYPES.get(st_dtype) != dtype or not fits:
                return f"tensor {key} is {st_dtype} {piece} at {offset}; this run needs {dtype} {list(shape)}"
            covered += math.prod(piece)
        if covered != math.prod(shape):
            return f"the pieces of tensor {key} cover {covered} of its {math.prod(shape)} elements (a shard is missing)"
    return None


@contextmanager
def _quiet_single_process():
    """DCP warns on every call in a single process that it assumes one: that is what we mean."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _to_lists(x):  # Python's RNG state is nested tuples; JSON has lists
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x
