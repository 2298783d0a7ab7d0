"""The ``--out`` folder of ``hesse demo`` and ``hesse analyze``: checked before any work, filled
all at once.

`check` refuses a folder that cannot be written (a file of that name, a path under a file, no
permission) before a command imports anything or trains anything. `staged` gives the command a
temporary folder beside the target to write its report and figures into, and only when all of
them are written moves them into place: a failure leaves nothing half-written. A reused folder
then holds exactly this run's outputs: hesse's own files from an earlier run that this run does
not write (a heat map, a density plot) are removed; files hesse does not write are never touched.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["OUTPUTS", "CommandError", "check", "staged"]

# Every file name hesse writes into --out: the only files it ever replaces or removes there.
OUTPUTS = (
    "report.json",
    "spectral_density.png",
    "curvature_heatmap.png",
    "hessian_heatmap.png",
    "per_layer.png",
)


class CommandError(Exception):
    """A mistake the user can fix, reported as one line without a traceback."""


def _existing_ancestor(path: Path) -> Path:
    """``path`` itself or its nearest ancestor that exists (a file or a folder)."""
    path = Path(os.path.abspath(path))
    while not os.path.lexists(path) and path.parent != path:
        path = path.parent
    return path


def check(out: Path) -> None:
    """Raise `CommandError` unless ``out`` is, or can be created as, a folder hesse writes to.

    Creates nothing that outlives the call (it probes the permission with an empty folder).
    """
    base = _existing_ancestor(out)
    if base == Path(os.path.abspath(out)):
        if not base.is_dir():
            raise CommandError(f"--out {out}: a file of that name exists; name a folder")
        for name in OUTPUTS:
            if (base / name).is_dir():
                raise CommandError(f"--out {out}: {out / name} is a folder, not hesse's {name}")
    elif not base.is_dir():
        raise CommandError(f"--out {out}: {base} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".hesse-probe-", dir=base))
    except OSError as err:
        raise CommandError(f"--out {out}: cannot write in {base} ({err.strerror})") from None


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A temporary folder to write the outputs into; moved into ``out`` when the block ends.

    On an error in the block or in the move, the temporary folder is removed and ``out`` is as
    it was. An `OSError` (disk full, permissions) becomes a `CommandError`.
    """
    check(out)
    out = Path(os.path.abspath(out))
    exists = out.is_dir()
    # Beside the target on its file system, so that moving in is a rename.
    stage = Path(tempfile.mkdtemp(prefix=".hesse-", dir=out if exists else _existing_ancestor(out)))
    try:
        yield stage
        names = sorted(p.name for p in stage.iterdir())
        unknown = set(names) - set(OUTPUTS)
        if unknown:  # a file hesse would not know as its own in the next run
            raise ValueError(f"not in hesse.cli._output.OUTPUTS: {sorted(unknown)}")
        if exists:
            _replace_outputs(stage, out, names)
        else:
            _move_folder(stage, out)
    except OSError as err:
        raise CommandError(f"--out {out}: could not write the results ({err})") from err
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _move_folder(stage: Path, out: Path) -> None:
    """Rename the finished folder to ``out``, creating its missing parents (removed again if
    the rename fails)."""
    missing = []
    parent = out.parent
    while not os.path.lexists(parent):
        missing.append(parent)
        parent = parent.parent
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # mkdtemp made it 0700; a folder the user asked for gets the mode mkdir would give.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(stage, 0o777 & ~umask)
        os.rename(stage, out)
    except OSError:
        for folder in missing:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def _replace_outputs(stage: Path, out: Path, names: list[str]) -> None:
    """Move this run's files into the existing ``out`` and take hesse's earlier outputs away,
    all or nothing: on a failure every file moved is moved back."""
    old = stage / ".previous"
    old.mkdir()
    taken: list[str] = []  # hesse's outputs of an earlier run, moved to `old`
    placed: list[str] = []  # this run's files, moved into `out`
    try:
        for name in OUTPUTS:
            if (out / name).is_file() or (out / name).is_symlink():
                os.replace(out / name, old / name)
                taken.append(name)
        for name in names:
            os.replace(stage / name, out / name)
            placed.append(name)
    except OSError:
        for name in placed:
            os.replace(out / name, stage / name)
        for name in taken:
            os.replace(old / name, out / name)
        raise
