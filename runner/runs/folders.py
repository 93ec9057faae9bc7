"""Where a run's results go: a new folder per run (never shared, even by runs started in the same
second), the resumed run's own folder, and whether Hydra writes ``.hydra/`` into it. Hydra calls
these as resolvers while it composes the config (runner/conf/config.yaml, ``hydra.run.dir``)."""
from __future__ import annotations

import atexit
import os
import tempfile
from pathlib import Path
from typing import Optional

from runner.engine import slurm
from runner.errors import UserError


class FolderClaims:
    """The folders this process has claimed, by the name asked for: Hydra may resolve the same
    interpolation more than once, and each time must get the folder claimed the first time."""

    def __init__(self) -> None:
        self.claimed: dict[str, str] = {}
        self.created_parents: list[Path] = []  # folders claim() made to hold the ones it claimed

    def claim(self, base: str) -> str:
        """Create ``base`` or, if taken, ``base_1``, ``base_2``... (``os.mkdir`` is atomic, so
        concurrent processes never share a folder)."""
        if base in self.claimed:
            return self.claimed[base]
        candidate, n = base, 0
        try:
            self.make_parents(Path(base))
            while True:
                try:
                    os.mkdir(candidate)
                    break
                except FileExistsError:
                    n += 1
                    candidate = f"{base}_{n}"
                except FileNotFoundError:  # another process removed the empty parent it had made
                    self.make_parents(Path(base))
            probe = Path(candidate) / ".writable"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise UserError(f"cannot create the run folder {candidate} (check output_root): {e.strerror or e}") from None
        self.claimed[base] = candidate
        return candidate

    def make_parents(self, folder: Path) -> None:
        missing = [parent for parent in folder.parents if not parent.exists()]
        folder.parent.mkdir(parents=True, exist_ok=True)
        if missing and not self.created_parents:
            atexit.register(self.remove_empty_parents)
        self.created_parents.extend(p for p in missing if p not in self.created_parents)

    def remove_empty_parents(self) -> None:
        """At exit: the folders made only to hold a run folder that is gone (a run rejected with
        exit 2 leaves no ``outputs/runs/``); rmdir refuses any that holds something."""
        for parent in sorted(self.created_parents, key=lambda p: len(p.parts), reverse=True):  # deepest first
            try:
                parent.rmdir()
            except OSError:
                pass


CLAIMS = FolderClaims()


def claim_unique_dir(base: str) -> str:
    """A new folder for ``base`` (a run's, or a sweep's); in a requeued SLURM job, the one its
    first start claimed (runner/engine/slurm.py), so that it continues there. Processes other
    than rank 0 of an external launcher get a scratch folder: they write nothing."""
    again = slurm.requeued_folder(base)
    if again is not None:
        return again
    if is_nonzero_rank():
        return tempfile.mkdtemp(prefix="runner-rank-")
    return slurm.remember_folder(base, CLAIMS.claim(base))


def is_nonzero_rank() -> bool:
    """True in a process other than rank 0 of an external launcher (torchrun, or srun's tasks):
    it writes no run folder."""
    return slurm.process_rank() != 0


def checked_root(output_root: str) -> str:
    """``output_root``, refused where it would put runs at the filesystem root: empty (an unset
    variable, ``output_root=$OUT``) or ``/`` (``output_root=$OUT/``)."""
    if not str(output_root).strip():
        raise UserError("output_root='' is empty: name the folder that gets runs/ and multirun/ (default: outputs)")
    if Path(output_root).expanduser().resolve() == Path("/").resolve():
        raise UserError(f"output_root={output_root!r} is the filesystem root: name a folder for runs/ and multirun/ "
                        "(default: outputs)")
    return str(output_root)


def run_folder(resume: Optional[str], base: str) -> str:
    if resume:
        # Checked here, before Hydra creates the folder: a resume that cannot start creates nothing.
        if not (Path(resume) / ".hydra" / "config.yaml").is_file():
            raise UserError(f"resume={resume} is not a run folder (no .hydra/config.yaml in it)")
        return str(resume)
    return claim_unique_dir(base)


def hydra_subdir(resume: Optional[str]) -> Optional[str]:
    # A resumed run keeps the .hydra/ of its first start: that is the config it continues. So does
    # a job of a resumed sweep that ran before (resume=<sweep folder> replays the sweep's command,
    # whose composition would otherwise overwrite the job's config with today's presets).
    return None if resume or is_nonzero_rank() or started_before() else ".hydra"


def started_before() -> bool:
    """Whether the job's output folder (evaluated by Hydra once it is set) holds a run already."""
    from hydra.core.hydra_config import HydraConfig

    try:
        folder = Path(HydraConfig.get().runtime.output_dir)
    except Exception:  # not set yet (composition), or no Hydra: a new folder
        return False
    return (folder / "summary.json").is_file() and (folder / ".hydra" / "config.yaml").is_file()
