"""Resumable solver runs: the solver's whole state saved atomically to one file, and refused on
resume when the solver, its options or the operator changed.

A solver given ``checkpoint=path`` resumes from ``path`` if it exists and otherwise starts fresh;
while it runs it saves its state there every ``checkpoint_every`` products and/or every
``checkpoint_seconds`` seconds (default: every 5 minutes), at points of its loop where the saved
state is everything the rest of the run depends on (the CPU generator's state, the convergence
check schedule, the basis, accumulators), so a resumed run repeats the uninterrupted run's
arithmetic and returns bit-identical results. Saving never changes the numbers.

Writes are atomic: ``torch.save`` into a temporary file in the same folder, ``fsync``, then
``os.replace`` over the old checkpoint; an interrupted write leaves the previous checkpoint in
place (and a stray temporary file, removed by the next run that opens the checkpoint).

Sharded runs (an operator whose ``vector_space`` says ``world_size > 1``: each rank holds only its
rows of the basis) keep one file per rank next to the given path, ``path.rank{R}-of-{N}``, each
written atomically by its rank and recording the world size, the rank, a run id shared by the
ranks and the number of products. On resume every rank loads its own file, and one collective
compares what the ranks found: a run resumed on another world size, a missing rank file, files
of different runs or of different save points (a file replaced by an older copy) are refused on
every rank, with a message saying what differs. Whether a save is due is agreed by the ranks
(one all-reduce of a flag per save point), so their files are always written at the same step.
Unsharded runs keep the single file, in the format above.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import secrets
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._operator import Operator
from ._space import Space

FORMAT = "torch-linop solver checkpoint"
VERSION = 1
DEFAULT_SECONDS = 300.0
_TEMP_SUFFIX = ".tmp"
# relative agreement of parameter checksums (float64 sums: rounding differences are ~1e-13)
_PARAMETER_RTOL = 1e-9
_SPACE_MARGIN = 1 << 28  # 256 MiB left free beyond a checkpoint's size
_PROBE_SEED = 0x5EED  # fixed probe for operators without parameters (own generator)

State = dict[str, Any]


def seed_option(seed: Any) -> Any:
    """How ``seed`` is recorded among the options: an int, None, or "generator" (whose state
    the checkpoint carries anyway)."""
    return "generator" if isinstance(seed, torch.Generator) else seed


class Checkpoint:
    """One solver run's checkpoint file; a no-op when ``path`` is None.

    ``load()`` returns the saved solver state (or None to start fresh); the solver calls
    ``maybe_save(num_matvecs, make_state)`` at its save points, and ``make_state()`` is only
    evaluated when a save is due.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        *,
        solver: str,
        options: Mapping[str, Any],
        op: Any,
        operator: Operator,
        every_matvecs: int | None = None,
        every_seconds: float | None = None,
    ) -> None:
        self.path = _check_path(path)
        self.solver = solver
        self.options = {name: _plain(value) for name, value in options.items()}
        self.every_matvecs, self.every_seconds = _check_intervals(every_matvecs, every_seconds)
        self.last_matvecs = 0
        self.last_time = time.monotonic()
        self.num_saves = 0
        self.warned_space = False
        self.fingerprint: State | None = None
        self.space: Space = operator.space
        # the path the caller gave; sharded runs write and read a file per rank next to it
        self.given_path = self.path
        self.sharded = self.path is not None and self.space.world_size > 1
        self.run_id = 0  # shared by the ranks of a sharded run (agreed or loaded in load())
        if self.path is not None:
            if self.sharded:
                self.path = rank_path(self.path, self.space.rank, self.space.world_size)
            self.fingerprint = fingerprint(op, operator)
            _remove_stale_temporaries(self.path)

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def load(self) -> State | None:
        """The saved state of a compatible run, None if there is no checkpoint file yet;
        ValueError if the file is unreadable or was written by another solver, with other
        options, or for another operator."""
        if self.path is None:
            return None
        if self.sharded:
            return self._load_sharded()
        payload = self._read()
        if payload is None:
            return None
        self.last_matvecs = int(payload["num_matvecs"])
        return payload["state"]

    def _read(self) -> State | None:
        """This process's checkpoint file, checked (None if there is none)."""
        assert self.path is not None
        if not self.path.exists():
            return None
        try:
            payload = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(
                f"checkpoint {self.path} is not a readable torch-linop checkpoint (torch.load "
                f"failed with {type(error).__name__}: truncated, corrupted or another format); "
                "delete it or pass another checkpoint path to start over"
            ) from error
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ValueError(
                f"{self.path} is not a torch-linop solver checkpoint; delete it or pass another "
                "checkpoint path"
            )
        if payload.get("version") != VERSION:
            raise ValueError(
                f"checkpoint {self.path} has format version {payload.get('version')!r}, this "
                f"torch-linop reads version {VERSION}; finish the run with the version that "
                "wrote it, or delete the file to start over"
            )
        if self.sharded:  # before the fingerprint, which differs between ranks anyway
            self._check_rank_record(payload)
        self._check_compatible(payload)
        return payload

    def _check_rank_record(self, payload: State) -> None:
        """A rank file must be this rank's, of this world size, from a sharded run."""
        world, rank = self.space.world_size, self.space.rank
        saved = (payload.get("world_size"), payload.get("rank"))
        if saved != (world, rank) or not isinstance(payload.get("run_id"), int):
            raise ValueError(
                f"checkpoint {self.path} records rank {saved[1]!r} of world size {saved[0]!r}, "
                f"but this is rank {rank} of {world} (a file renamed or copied from another "
                f"rank or run); {_FIX_SHARDED}"
            )

    def _load_sharded(self) -> State | None:
        """Every rank loads its own file; one collective compares what the ranks found, and
        all of them resume, start fresh or raise together (none is left in a collective)."""
        assert self.given_path is not None
        world, rank = self.space.world_size, self.space.rank
        payload, error = None, None
        try:
            payload = self._read()
        except ValueError as raised:
            error = raised
        other_worlds = _rank_file_world_sizes(self.given_path) - {world}
        row = torch.tensor(
            [
                float(payload is not None),
                float(error is not None),
                float(payload["run_id"]) if payload is not None else 0.0,
                float(payload["num_matvecs"]) if payload is not None else -1.0,
                float(max(other_worlds, default=0)),
                float(self.given_path.is_file()),
            ],
            dtype=torch.float64,
        )
        table = self.space.gather(row)
        failed = [other for other in range(world) if table[other, 1] > 0]
        if failed:
            if error is not None:
                raise error
            raise ValueError(
                f"the checkpoint file of rank {failed[0]} ("
                f"{rank_path(self.given_path, failed[0], world)}) cannot be resumed from (that "
                f"rank's error says why); every rank refuses the run; {_FIX_SHARDED}"
            )
        present = [other for other in range(world) if table[other, 0] > 0]
        if not present:
            self._refuse_foreign_files(table)
            bits = torch.tensor([float(secrets.randbits(52))], dtype=torch.float64)
            self.run_id = int(self.space.reduce(bits, "max")[0])  # one id for all ranks
            return None
        if len(present) < world:
            missing = [other for other in range(world) if other not in present]
            raise ValueError(
                f"checkpoint {self.given_path} of a run over {world} ranks lacks the file of "
                f"rank(s) {missing} (e.g. {rank_path(self.given_path, missing[0], world)}), while "
                f"rank(s) {present} have theirs: every rank needs its own file to resume; restore "
                f"the missing file(s), or {_FIX_SHARDED}"
            )
        run_ids = [int(table[other, 2]) for other in range(world)]
        steps = [int(table[other, 3]) for other in range(world)]
        if len(set(run_ids)) > 1:
            raise ValueError(
                f"the checkpoint files {self.given_path}.rank*-of-{world} come from different "
                f"runs (run id per rank: {run_ids}); {_FIX_SHARDED}"
            )
        if len(set(steps)) > 1:
            per_rank = ", ".join(f"rank {other} after {steps[other]}" for other in range(world))
            raise ValueError(
                f"the checkpoint files {self.given_path}.rank*-of-{world} were saved at different "
                f"points of the run ({per_rank} products: a file was replaced by another copy, "
                f"or a save was cut short); {_FIX_SHARDED}"
            )
        assert payload is not None
        self.run_id = run_ids[rank]
        self.last_matvecs = steps[rank]
        return payload["state"]

    def _refuse_foreign_files(self, table: torch.Tensor) -> None:
        """No rank has a file of this world size: refuse files of another world size or of an
        unsharded run at the given path, rather than starting over beside them."""
        world = self.space.world_size
        other_world = int(table[:, 4].max())
        if other_world:
            raise ValueError(
                f"checkpoint {self.given_path} was written by a sharded run over {other_world} "
                f"ranks ({self.given_path}.rank*-of-{other_world}), but this run has {world} "
                f"ranks: each rank's file holds its own rows of the basis, so resume with "
                f"{other_world} ranks (the same world size), or {_FIX_SHARDED}"
            )
        if table[:, 5].max() > 0:
            raise ValueError(
                f"checkpoint {self.given_path} was written by an unsharded run; this sharded run "
                f"over {world} ranks keeps one file per rank ({self.given_path}.rank0-of-{world}, "
                f"...): resume it unsharded, or {_FIX_SHARDED}"
            )

    def _check_compatible(self, payload: State) -> None:
        fix = "pass another checkpoint path (or delete the file) to start a new run"
        if payload["solver"] != self.solver:
            raise ValueError(
                f"checkpoint {self.path} was written by {payload['solver']}(), not "
                f"{self.solver}(); {fix}"
            )
        assert self.fingerprint is not None
        mismatch = fingerprint_mismatch(payload["fingerprint"], self.fingerprint)
        if mismatch is not None:
            raise ValueError(
                f"checkpoint {self.path} was written for a different operator ({mismatch}): "
                f"resume with the same model, parameters and operator, or {fix}"
            )
        saved_options = payload["options"]
        if saved_options != self.options:
            names = sorted(set(saved_options) | set(self.options))
            differences = [
                f"{name}={saved_options.get(name)!r} in the checkpoint, {self.options.get(name)!r} now"
                for name in names
                if saved_options.get(name) != self.options.get(name)
            ]
            raise ValueError(
                f"checkpoint {self.path} was written by {self.solver}() with other options ("
                + "; ".join(differences)
                + f"): resume with the same options, or {fix}"
            )

    def maybe_save(self, num_matvecs: int, make_state: Callable[[], State]) -> bool:
        """Save ``make_state()`` if ``every_matvecs`` products or ``every_seconds`` seconds have
        passed since the last save (or the start); returns whether it saved."""
        if self.path is None:
            return False
        due = (
            self.every_matvecs is not None and num_matvecs - self.last_matvecs >= self.every_matvecs
        ) or (
            self.every_seconds is not None
            and time.monotonic() - self.last_time >= self.every_seconds
        )
        due = due and num_matvecs != self.last_matvecs
        if self.sharded:  # a clock may tick on one rank only: save when any rank is due
            due = self._on_any_rank(due)
        if not due:
            return False
        state = make_state()
        fits = self._fits(_state_bytes(state))
        if self.sharded:  # all ranks save, or none: their files stay at the same step
            fits = not self._on_any_rank(not fits)
        if not fits:
            self.last_matvecs = num_matvecs  # try again at the next due point
            self.last_time = time.monotonic()
            return False
        payload = {
            "format": FORMAT,
            "version": VERSION,
            "solver": self.solver,
            "options": self.options,
            "fingerprint": self.fingerprint,
            "num_matvecs": int(num_matvecs),
            "state": _to_cpu(state),
        }
        if self.sharded:
            payload.update(
                world_size=self.space.world_size, rank=self.space.rank, run_id=self.run_id
            )
        atomic_save(payload, self.path)
        self.last_matvecs = num_matvecs
        self.last_time = time.monotonic()
        self.num_saves += 1
        return True

    def _on_any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank (one all-reduce; the same answer on all)."""
        partial = torch.tensor([float(flag)], dtype=torch.float64)
        return bool(self.space.reduce(partial, "max")[0] > 0)

    def _fits(self, num_bytes: int) -> bool:
        """Whether a checkpoint of ``num_bytes`` fits on the disk and in host memory (it is
        staged there); if not, warn (once) and let the run go on unsaved instead of failing a
        long run at its save point."""
        assert self.path is not None
        disk_free = shutil.disk_usage(self.path.parent).free
        # the old file is replaced only after the new one is written: both exist for a moment
        host_free = _available_host_memory()
        if num_bytes + _SPACE_MARGIN <= disk_free and (
            host_free is None or num_bytes + _SPACE_MARGIN <= host_free
        ):
            return True
        if not self.warned_space:
            warnings.warn(
                f"checkpoint not saved: its state takes {num_bytes / 2**30:.1f} GiB but "
                f"{disk_free / 2**30:.1f} GiB are free on the disk of {self.path} and "
                f"{'?' if host_free is None else f'{host_free / 2**30:.1f}'} GiB in host "
                "memory; the run goes on without checkpoints (free space, use a smaller "
                "basis: max_basis=..., or checkpoint elsewhere)",
                RuntimeWarning,
                stacklevel=3,
            )
            self.warned_space = True
        return False


_FIX_SHARDED = (
    "pass another checkpoint path (or delete all the files path.rank*-of-*) to start a new run"
)
_RANK_FILE = re.compile(r"\.rank(\d+)-of-(\d+)$")


def rank_path(path: Path, rank: int, world_size: int) -> Path:
    """The file of ``rank`` in a sharded run over ``world_size`` ranks checkpointed to ``path``:
    ``path.rank{rank}-of-{world_size}`` in the same folder."""
    return path.with_name(f"{path.name}.rank{rank}-of-{world_size}")


def _rank_file_world_sizes(path: Path) -> set[int]:
    """The world sizes of the rank files of ``path`` in its folder."""
    sizes = set()
    for candidate in path.parent.glob(f"{glob_escape(path.name)}.rank*-of-*"):
        found = _RANK_FILE.search(candidate.name[len(path.name) :])
        if found is not None and candidate.name == f"{path.name}{found.group(0)}":
            sizes.add(int(found.group(2)))
    return sizes


def glob_escape(name: str) -> str:
    """``name`` with glob's special characters taken literally."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def _state_bytes(value: Any) -> int:
    """Bytes of the tensors and arrays in a nested state (what a checkpoint will hold)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, dict):
        return sum(_state_bytes(item) for item in value.values())
    if isinstance(value, list | tuple):
        return sum(_state_bytes(item) for item in value)
    return 0


def _available_host_memory() -> int | None:
    """``MemAvailable`` from /proc/meminfo (None where there is none)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def atomic_save(payload: Any, path: Path) -> None:
    """``torch.save(payload)`` to ``path`` so that a crash at any moment leaves either the old
    file or the complete new one: temporary file in the same folder, fsync, ``os.replace``."""
    handle, temporary = tempfile.mkstemp(
        prefix=f".{path.name}.{os.getpid()}.", suffix=_TEMP_SUFFIX, dir=path.parent
    )
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable (POSIX); silently skipped where folders cannot be opened."""
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def _remove_stale_temporaries(path: Path) -> None:
    """Delete temporary files of ``path`` left by writers that were killed mid-save (their
    process is gone); files of live processes are kept."""
    for temporary in path.parent.glob(f".{path.name}.*{_TEMP_SUFFIX}"):
        fields = temporary.name[len(path.name) + 2 :].split(".")
        if not fields or not fields[0].isdigit():
            continue
        pid = int(fields[0])
        if pid != os.getpid() and not _process_alive(pid):
            with contextlib.suppress(OSError):
                temporary.unlink()


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else
        return True
    return True


def _check_path(path: Any) -> Path | None:
    if path is None:
        return None
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"checkpoint must be a path (str or os.PathLike) or None, got {path!r}")
    resolved = Path(path)
    if resolved.is_dir():
        raise ValueError(
            f"checkpoint={str(path)!r} is a folder; pass a file path such as "
            f"{str(resolved / 'lanczos.pt')!r}"
        )
    if not resolved.parent.is_dir():
        raise ValueError(
            f"the folder of checkpoint={str(path)!r} does not exist; create it first "
            f"(os.makedirs({str(resolved.parent)!r}))"
        )
    return resolved


def _check_intervals(every_matvecs: Any, every_seconds: Any) -> tuple[int | None, float | None]:
    if every_matvecs is not None and (
        not isinstance(every_matvecs, int) or isinstance(every_matvecs, bool) or every_matvecs < 1
    ):
        raise ValueError(
            f"checkpoint_every must be None or a number of matvecs >= 1, got {every_matvecs!r}"
        )
    if every_seconds is not None and not (
        isinstance(every_seconds, int | float)
        and not isinstance(every_seconds, bool)
        and math.isfinite(every_seconds)
        and every_seconds > 0
    ):
        raise ValueError(
            f"checkpoint_seconds must be None or a positive number of seconds, got "
            f"{every_seconds!r}"
        )
    if every_matvecs is None and every_seconds is None:
        every_seconds = DEFAULT_SECONDS
    return every_matvecs, None if every_seconds is None else float(every_seconds)


def _plain(value: Any) -> Any:
    """Options as plain, comparable, weights_only-loadable values."""
    if isinstance(value, torch.dtype | torch.device):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def _to_cpu(value: Any) -> Any:
    """Copies of every tensor in a nested state on the CPU (own storage, not a view of a larger
    buffer); numpy arrays become tensors so ``weights_only`` loading accepts them."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_cpu(item) for item in value)
    if isinstance(value, np.generic):
        return value.item()
    return value


# ----------------------------------------------------------------------------- fingerprints
def fingerprint(op: Any, operator: Operator) -> State:
    """What identifies the operator: its type, size and dtype, and either what the operator
    says identifies it (its ``fingerprint()``: a dict of JSON-able values, e.g. parameter
    checksums and product settings) or, for any other operator, a signature of its product
    with a fixed probe (one extra product)."""
    record: State = {
        "type": type(op).__name__,
        "size": operator.size,
        "dtype": str(getattr(op, "torch_dtype", getattr(op, "dtype", operator.dtype))),
    }
    own = getattr(op, "fingerprint", None)
    if callable(own):
        described = own()
        if not isinstance(described, Mapping):
            raise TypeError(
                f"{type(op).__name__}.fingerprint() returned {type(described).__name__}; it "
                "must return a dict of JSON-able values (str, int, float, lists, dicts)"
            )
        record["operator"] = {str(key): _json_value(value) for key, value in described.items()}
        return record
    record["probe"] = _probe_signature(operator)
    record["probe_rtol"] = math.sqrt(operator.eps)
    return record


def _json_value(value: Any) -> Any:
    """``value`` as plain JSON-able data (tuples become lists, numpy scalars numbers)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list | tuple):
        return [_json_value(item) for item in value]
    if isinstance(value, Mapping):
        return {str(key): _json_value(item) for key, item in value.items()}
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise TypeError(
        f"an operator fingerprint holds {type(value).__name__} ({value!r}); use str, int, "
        "float, bool, None, lists and dicts"
    )


def _probe_signature(operator: Operator) -> torch.Tensor:
    """float64 ``[sum(y), ||y||, v.y, y[0], y[n//2], y[-1]]`` for ``y = H v`` with a fixed
    Gaussian probe ``v`` from a private generator (the solver's generator is not touched); for
    sharded vectors, over this process's entries."""
    generator = torch.Generator().manual_seed(_PROBE_SEED)
    probe = operator.probes(1, generator, "gaussian")
    product = operator.matmat(probe)[:, 0].to(torch.float64)
    probe64 = probe[:, 0].to(torch.float64)
    length = product.shape[0]
    if length == 0:
        return torch.zeros(6, dtype=torch.float64)
    return torch.stack(
        [
            product.sum(),
            torch.linalg.vector_norm(product),
            probe64 @ product,
            product[0],
            product[length // 2],
            product[length - 1],
        ]
    ).cpu()


def _close(saved: Any, current: Any) -> bool:
    """Equal, numbers to a relative ``_PARAMETER_RTOL`` (rounding of float64 checksums)."""
    if isinstance(saved, bool) or isinstance(current, bool):
        return saved == current
    if isinstance(saved, int | float) and isinstance(current, int | float):
        return abs(saved - current) <= _PARAMETER_RTOL * max(abs(saved), abs(current))
    if isinstance(saved, list) and isinstance(current, list):
        return len(saved) == len(current) and all(map(_close, saved, current))
    if isinstance(saved, dict) and isinstance(current, dict):
        return saved.keys() == current.keys() and all(
            _close(saved[key], current[key]) for key in saved
        )
    return bool(saved == current)


def _is_numeric(value: Any) -> bool:
    if isinstance(value, list):
        return bool(value) and all(_is_numeric(item) for item in value)
    return isinstance(value, int | float) and not isinstance(value, bool)


def fingerprint_mismatch(saved: State, current: State) -> str | None:
    """A description of how two fingerprints differ, None if they describe the same operator."""
    for key in ("type", "size", "dtype"):
        if saved.get(key) != current.get(key):
            return f"{key} {saved.get(key)!r} in the checkpoint, {current.get(key)!r} now"
    if ("operator" in saved) != ("operator" in current):
        return "one operator describes itself with fingerprint(), the other not"
    if "operator" in saved:
        old, new = saved["operator"], current["operator"]
        for key in [*new, *(key for key in old if key not in new)]:
            if key not in old or key not in new:
                where = "the checkpoint" if key in old else "this operator"
                return f"{key} is only in {where}'s fingerprint"
            if not _close(old[key], new[key]):
                if _is_numeric(old[key]) and _is_numeric(new[key]):
                    return f"{key} differ: another model state"
                return f"{key} {old[key]!r} in the checkpoint, {new[key]!r} now"
        return None
    old_probe, new_probe = saved["probe"], current["probe"]
    rtol = max(float(saved["probe_rtol"]), float(current["probe_rtol"]))
    probe_scale = float(new_probe[1]) * math.sqrt(current["size"]) + 1e-300
    if float((old_probe - new_probe).abs().max()) > rtol * probe_scale:
        return "its product with a fixed probe differs"
    return None
