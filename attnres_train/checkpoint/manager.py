"""Atomic, verifiable, reshardable checkpoints: DCP files + config + meta/manifest + per-rank RNG + a marker.

Why this shape: a crash at any point must leave either a complete checkpoint or an ignored leftover (written
under ``step_N.tmp-<nonce>/``, renamed, then ``COMMITTED`` last); a truncated or altered file must fail with
an error naming it before DCP reads a byte (manifest of sha256 + sizes); retention never deletes the
checkpoint just committed; async saves copy to CPU and write from a thread. The format one directory has
(names, manifest, verification) is layout.py; each rule: docs/training.md "Checkpoints".
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable, List, Optional

import torch
from torch.distributed.checkpoint.api import CheckpointException

from ..config.errors import UserInputError
from .layout import (
    CONFIG,
    FORMAT_VERSION,
    MARKER,
    META,
    RNG_DIR,
    build_manifest,
    fsync_dir,
    is_complete,
    read_config_text,
    scan,
    sha256_file,
    sha256_text,
    step_dir_name,
    step_of,
    verify_checkpoint,
)
from .layout import write_durable as _write_durable  # by this name: tests/train/test_kill_resume.py kills a save
from .rng import capture_rng, restore_rng
from .safe_dcp import dcp_async_save, dcp_load, dcp_save, distributed
from .space import CheckpointSaveError, checkpoint_bytes, mib, root_error, state_bytes

log = logging.getLogger(__name__)

_RESERVED_META = ("format_version", "step", "world_size", "time", "manifest", "config_sha256")


class CheckpointManager:
    """Save / find / verify / load / prune checkpoints under ``root_dir`` (one per saved step).

    ``barrier`` synchronises ranks; None means ``torch.distributed.barrier`` when a process group is
    initialised and ``world_size > 1``, else nothing. With a process group every rank calls :meth:`save`
    and :meth:`load` (DCP's collectives); rank 0 alone writes meta/config/marker, renames and prunes.
    The directory must be shared by all ranks (as DCP's file system writer requires).
    """

    def __init__(
        self,
        root_dir,
        keep_last: int,
        rank: int = 0,
        world_size: int = 1,
        barrier: Optional[Callable[[], None]] = None,
        *,
        async_save: bool = False,
        timeout_s: Optional[float] = None,
    ):
        """``async_save``: create (collectively: every rank constructs the manager) the gloo group that
        background saves run DCP's collectives on; ``timeout_s`` is that group's collective timeout."""
        self.root = Path(root_dir)
        self.keep_last = int(keep_last)
        self.rank = rank
        self.world_size = world_size
        self._barrier_fn = barrier
        self._pending: Optional[_PendingSave] = None
        self._async_group = None
        if async_save and world_size > 1 and distributed():
            timeout = timedelta(seconds=timeout_s) if timeout_s else None
            self._async_group = torch.distributed.new_group(backend="gloo", timeout=timeout)

    # -- discovery ----------------------------------------------------------------------------------------
    def complete(self) -> List[Path]:
        """Complete checkpoints, oldest first."""
        return [p for _, p in scan(self.root)[0]]

    def stale(self) -> List[Path]:
        """Leftovers of interrupted saves (``*.tmp-*`` dirs, step dirs without a marker): never loaded."""
        return scan(self.root)[1]

    def latest(self, report: bool = True) -> Optional[Path]:
        """Newest complete checkpoint, or None. Stale leftovers are ignored (and, with ``report``, logged)."""
        complete, stale = scan(self.root)
        if stale and report:
            log.warning(
                "ignoring %d incomplete checkpoint dir(s) from interrupted saves: %s (removed on the next save)",
                len(stale),
                ", ".join(p.name for p in stale),
            )
        return complete[-1][1] if complete else None

    def resolve(self, resume, report: bool = True) -> Optional[Path]:
        """``"none"`` (or None/"") → None; ``"auto"`` → :meth:`latest`; else a checkpoint dir, or a dir of them."""
        if resume is None or str(resume).strip().lower() in ("", "none"):
            return None
        if str(resume).strip().lower() == "auto":
            return self.latest(report=report)
        path = Path(resume).expanduser()
        if is_complete(path):
            return path
        if path.is_dir():
            complete, _ = scan(path)
            if complete:
                return complete[-1][1]
        why = "does not exist" if not path.exists() else "is not a complete checkpoint (no COMMITTED marker)"
        raise UserInputError(
            f"checkpoint.resume={resume}: {path} {why} and holds no complete checkpoint (checkpoint.resume takes "
            "auto, none, or a checkpoint, checkpoints/ or run directory)"
        )

    @staticmethod
    def read_config_text(path) -> str:
        """The resolved config text saved with checkpoint ``path`` (same as the module-level function)."""
        return read_config_text(path)

    # -- saving --------------------------------------------------------------------------------------------
    def _barrier(self) -> None:
        if self._barrier_fn is not None:
            self._barrier_fn()
        elif self.world_size > 1 and distributed():
            torch.distributed.barrier()

    def _shared_nonce(self) -> str:
        nonce = secrets.token_hex(4)
        if self.world_size > 1 and distributed():
            box = [nonce]
            torch.distributed.broadcast_object_list(box, src=0)
            nonce = box[0]
        return nonce

    def _remove(self, path: Path) -> None:
        (path / MARKER).unlink(missing_ok=True)  # never leave a half-deleted dir that looks complete
        shutil.rmtree(path, ignore_errors=True)

    def _from_rank0(self, value: str) -> str:
        if self.world_size > 1 and distributed():
            box = [value]
            torch.distributed.broadcast_object_list(box, src=0)
            value = box[0]
        return value

    def _space_problem(self, state_dict: dict) -> str:
        """Rank 0, before a save: "" if the file system has room for one more checkpoint, else why not.

        The need is the size of the newest complete checkpoint (the older ones are deleted only after the new
        one is committed); before the first one, this rank's tensor bytes times the world size (an estimate).
        """
        newest = self.latest(report=False)
        if newest is not None:
            need, what = checkpoint_bytes(newest / META), f"the last checkpoint {newest.name}'s size"
        else:
            need, what = state_bytes(state_dict) * self.world_size, "the estimated size of the state"
        free = shutil.disk_usage(self.root).free
        if free >= need:
            return ""
        return (
            f"only {mib(free)} free on the file system of {self.root}, {what} is {mib(need)} (No space left on device)"
        )

    def _intact_hint(self) -> str:
        newest = self.latest(report=False)
        where = (
            f"The newest complete checkpoint {newest} is intact: free space (checkpoint.keep_last bounds how many "
            "are kept) and resume from it with checkpoint.resume=auto."
            if newest is not None
            else "This run has no complete checkpoint yet."
        )
        return where

    def _failed(self, step: int, tmp: Path, final: Path, exc: BaseException) -> CheckpointSaveError:
        """A save failed on this rank: rank 0 removes what it wrote; returns the error to raise."""
        err = root_error(exc)
        if self.rank == 0:
            self._remove(tmp)
            if final.is_dir() and not is_complete(final):  # renamed, but the marker could not be written
                self._remove(final)
        why = f"{type(err).__name__}: {err}".strip().splitlines()[0][:300]
        return CheckpointSaveError(
            f"checkpoint save of step {step} to {final} failed ({why}); the partial directory "
            "was removed. " + self._intact_hint()
        )

    def save(self, step: int, state_dict: dict, *, config_text: str, meta: dict, blocking: bool = True) -> Path:
        """Write checkpoint ``step`` atomically and prune old ones; returns its final directory.

        ``state_dict``: nested dict of tensors (e.g. ``{"model": ..., "optim": ...}`` from DCP's
        ``get_state_dict``). ``meta``: JSON-serialisable run position (``tokens_seen``, ``data`` ...); the
        manager adds step, world size, time, the config's sha256 and the manifest (``step``/``world_size``
        given in ``meta`` must agree with them). Every rank must call this.

        ``blocking=False``: return once the state is copied to CPU memory; the files are written and the
        checkpoint committed in the background (see the module docstring); :meth:`wait` finishes it. Any
        earlier background save is waited for first.
        """
        self.wait()
        ours = {"step": int(step), "world_size": self.world_size}
        for key in _RESERVED_META:
            if key in meta and (key not in ours or meta[key] != ours[key]):
                raise ValueError(
                    f"meta[{key!r}]={meta[key]!r} conflicts with the value the checkpoint manager "
                    f"records ({ours.get(key, 'computed at save time')!r})"
                )
        json.dumps(meta)  # fail before writing anything if meta is not JSON-serialisable
        final = self.root / step_dir_name(step)
        nonce = self._shared_nonce()
        tmp = self.root / f"{final.name}.tmp-{nonce}"
        self._barrier()  # everyone has the nonce before rank 0 touches the directory
        problem = ""
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for p in self.stale():
                log.warning("removing incomplete checkpoint dir %s left by an interrupted save", p)
                self._remove(p)
            problem = self._space_problem(state_dict)
        problem = self._from_rank0(problem)  # every rank stops alike (a collective on the way out would hang)
        if problem:
            raise CheckpointSaveError(
                f"checkpoint save of step {step} refused: {problem}; nothing was written. " + self._intact_hint()
            )
        self._barrier()
        meta = {**meta, **ours, "format_version": FORMAT_VERSION, "config_sha256": sha256_text(config_text)}
        try:
            tmp.mkdir(parents=True, exist_ok=True)
            (tmp / RNG_DIR).mkdir(exist_ok=True)
            torch.save(capture_rng(), tmp / RNG_DIR / f"rank_{self.rank}.pt")  # before DCP: see the docstring
            if blocking:
                dcp_save(state_dict, tmp)
                self._barrier()  # all ranks' DCP shards and RNG files are on disk
                if self.rank == 0:
                    self._commit(tmp, final, config_text, meta)
                self._barrier()
                return final
            future = dcp_async_save(state_dict, tmp, self._async_group)
        except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
            error = self._failed(int(step), tmp, final, exc)
            if isinstance(root_error(exc), KeyboardInterrupt):  # a second Ctrl-C inside DCP: still an interrupt
                raise KeyboardInterrupt from None
            raise error from None
        pending = _PendingSave(int(step), final, future, tmp)
        if self.rank == 0:
            pending.thread = threading.Thread(
                target=pending.commit_when_written,
                name=f"commit-{final.name}",
                args=(lambda: self._commit(tmp, final, config_text, meta),),
            )
            pending.thread.start()
        self._pending = pending
        return final

    def _commit(self, tmp: Path, final: Path, config_text: str, meta: dict) -> None:
        """Rank 0, once every rank's files are in ``tmp``: config, meta + manifest, rename, marker, prune."""
        _write_durable(tmp / CONFIG, config_text)
        full_meta = {**meta, "time": time.time(), "manifest": build_manifest(tmp)}
        _write_durable(tmp / META, json.dumps(full_meta, indent=1, sort_keys=True))
        fsync_dir(tmp)
        aside = None
        if final.exists():  # same step from an earlier run (e.g. resumed from an older checkpoint): this run wins
            log.warning("replacing the existing checkpoint %s with this run's state at the same step", final)
            aside = self.root / f"{tmp.name}-replaced"  # a .tmp name: a leftover if we crash before removing it
            (final / MARKER).unlink(missing_ok=True)
            os.replace(final, aside)
        os.replace(tmp, final)
        fsync_dir(self.root)
        _write_durable(final / MARKER, json.dumps({"meta_sha256": sha256_file(final / META)}))
        fsync_dir(final)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        self._prune(keep=final)

    @property
    def pending(self) -> Optional[Path]:
        """The directory a background save is writing (not yet known to be committed), or None."""
        return self._pending.final if self._pending is not None else None

    def wait(self) -> Optional[Path]:
        """Finish the background save, if any: every rank waits for its writes, rank 0 for the commit.

        Returns the committed checkpoint (None if there was nothing to wait for). Collective when a background
        save is pending (every rank must call it); raises :class:`CheckpointSaveError` on every rank if any rank
        failed (rank 0 removes the partial directory).
        """
        p, self._pending = self._pending, None
        if p is None:
            return None
        err = p.join()
        failed = bool(err)
        if self._async_group is not None:
            flag = torch.tensor([1.0 if err else 0.0])
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self._async_group)
            failed = bool(flag.item() > 0)
        if failed:
            if err is not None:
                raise self._failed(p.step, p.tmp, p.final, err) from None
            if self.rank == 0:
                self._remove(p.tmp)
            raise CheckpointSaveError(
                f"background checkpoint save of step {p.step} to {p.final} failed on another "
                "rank; that checkpoint was not committed. " + self._intact_hint()
            )
        if self._async_group is not None:
            torch.distributed.barrier(group=self._async_group)
        return p.final

    def _prune(self, keep: Optional[Path] = None) -> None:
        """Keep ``keep`` (the checkpoint just committed) and the newest ``keep_last - 1`` others by step."""
        if self.keep_last <= 0:
            return
        others = [p for p in self.complete() if p != keep]
        if keep is not None and others and step_of(others[-1]) > step_of(keep):
            log.warning(
                "%s holds checkpoints with higher steps than the one just saved (%s) from a run that went "
                "further; checkpoint.resume=auto picks the highest step",
                self.root,
                keep.name,
            )
        budget = self.keep_last - (1 if keep is not None else 0)
        for old in others[: max(0, len(others) - budget)]:
            log.info("removing old checkpoint %s (keep_last=%d)", old, self.keep_last)
            self._remove(old)

    # -- loading -------------------------------------------------------------------------------------------
    def load(self, path, state_dict: dict, *, restore_rng_state: bool = True, meta: Optional[dict] = None) -> dict:
        """Verify checkpoint ``path``, load it into ``state_dict`` in place and return its meta.

        ``meta``: what :func:`verify_checkpoint` returned for ``path`` just before (skips hashing it again).
        Restores this rank's RNG state when the checkpoint has a file for it (a resumed run with a different
        world size keeps its fresh RNG state on ranks the checkpoint did not have).
        """
        path = Path(path)
        if meta is None:
            meta = verify_checkpoint(path)
        try:
            dcp_load(state_dict, path)
        except CheckpointException as exc:  # a BaseException: wraps every rank's failure (key/shape mismatch)
            failures = [e for e, _ in exc.failures.values()]
            for e in failures:
                if isinstance(e, UserInputError):
                    raise e from None
            first = failures[0] if failures else exc
            why = (str(first).strip().splitlines() or [""])[0][:500]
            raise UserInputError(
                f"checkpoint {path} does not match the current model/optimizer state: {type(first).__name__}: {why}"
            ) from None
        rng_file = path / RNG_DIR / f"rank_{self.rank}.pt"
        if restore_rng_state:
            if rng_file.is_file():
                restore_rng(torch.load(rng_file, weights_only=True))
            else:
                log.warning("checkpoint %s has no RNG state for rank %d; keeping this run's", path, self.rank)
        return meta


class _PendingSave:
    """One background save: this rank's DCP future and, on rank 0, the thread that commits after it."""

    def __init__(self, step: int, final: Path, future, tmp: Path):
        self.step, self.final, self.future, self.tmp = step, final, future, tmp
        self.thread: Optional[threading.Thread] = None
        self.error: Optional[BaseException] = None

    def commit_when_written(self, commit: Callable[[], None]) -> None:
        try:
            self.future.result()
            commit()
        except BaseException as exc:  # reported by join() in the main thread
            self.error = exc

    def join(self) -> Optional[BaseException]:
        if self.thread is not None:
            self.thread.join()
            return self.error
        try:
            self.future.result()
        except BaseException as exc:
            return exc
        return None
