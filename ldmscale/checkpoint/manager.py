"""Step directories committed atomically: write `step-N.tmp/`, marker last, rename, then `latest`.

A folder counts as a checkpoint only if it holds the commit marker, also after the rename: a copied
or partly synced folder on a shared filesystem can exist without it (torchtitan's rule). `latest`
is a one-line file naming the newest committed folder; when it is missing or points at something
uncommitted, the newest committed folder on disk is used instead.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Callable

from ldmscale.checkpoint.io import atomic_write_json, atomic_write_text, fsync_dir
from ldmscale.distributed.env import ProcessEnv, barrier

COMMIT_MARKER = "COMMITTED"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step-(\d{8})$")

log = logging.getLogger(__name__)


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def is_committed(directory: Path) -> bool:
    return (directory / COMMIT_MARKER).is_file()


class CheckpointManager:
    def __init__(self, root: Path, keep_last: int, penv: ProcessEnv):
        self.root = Path(root)
        self.keep_last = keep_last
        self.penv = penv

    def committed_steps(self) -> list[int]:
        if not self.root.is_dir():
            return []
        steps = []
        for child in self.root.iterdir():
            match = _STEP_DIR.match(child.name)
            if match and child.is_dir() and is_committed(child):
                steps.append(int(match.group(1)))
        return sorted(steps)

    def latest(self) -> Path | None:
        """The newest committed checkpoint, preferring what `latest` names when it is committed."""
        pointer = self.root / LATEST
        if pointer.is_file():
            named = self.root / pointer.read_text().strip()
            if named.is_dir() and is_committed(named) and _STEP_DIR.match(named.name):
                newer = [s for s in self.committed_steps() if s > int(named.name[5:])]
                if not newer:
                    return named
            else:
                log.warning("checkpoint pointer %s names %s, which is not a committed checkpoint; "
                            "falling back to the newest committed folder", pointer, named.name)
        steps = self.committed_steps()
        return self.root / step_dir_name(steps[-1]) if steps else None

    def save(self, step: int, write: Callable[[Path], None]) -> Path:
        """Collective: every rank calls it; `write(tmp_dir)` writes this rank's files."""
        final = self.root / step_dir_name(step)
        tmp = self.root / (step_dir_name(step) + ".tmp")
        if self.penv.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        barrier()
        write(tmp)
        barrier()
        if self.penv.is_main:
            atomic_write_json(tmp / COMMIT_MARKER, {"step": step, "world_size": self.penv.world_size,
                                                    "time": time.time()})
            fsync_dir(tmp)
            if final.exists():  # the same step saved again (for example on a signal right after a save)
                shutil.rmtree(final)
            tmp.rename(final)
            fsync_dir(self.root)
            atomic_write_text(self.root / LATEST, final.name + "\n")
            self._prune()
        barrier()
        return final

    def remove_incomplete(self) -> None:
        """Deletes `*.tmp` folders left by a crash during a write (main rank, before training)."""
        if not self.penv.is_main or not self.root.is_dir():
            return
        for child in self.root.glob("step-*.tmp"):
            log.warning("removing incomplete checkpoint %s", child)
            shutil.rmtree(child, ignore_errors=True)

    def _prune(self) -> None:
        steps = self.committed_steps()
        for step in steps[: max(0, len(steps) - self.keep_last)]:
            shutil.rmtree(self.root / step_dir_name(step), ignore_errors=True)

    @staticmethod
    def describe(directory: Path) -> dict:
        return json.loads((directory / COMMIT_MARKER).read_text())
