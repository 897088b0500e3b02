"""Checkpoints of long sweeps: an append-only table plus a manifest of the finished chunks.

A sweep with a checkpoint folder appends each finished chunk's rows to ``rows.jsonl`` (one JSON
object per configuration), flushes them to disk, and only then appends the chunk to
``manifest.jsonl`` (its configuration ids). A sweep killed at any moment therefore leaves at worst
rows of a chunk the manifest does not list, and a last line cut in the middle; both are ignored on
restart, and that chunk runs again. Restarted with the same command, the sweep skips every chunk
whose configurations the manifest lists, and the table it writes is the one an uninterrupted run
writes (rows are keyed by their configuration id, so a chunk run twice gives no duplicate).

The manifest's first line names the sweep (a fingerprint of its points and configuration): a
folder holding another sweep's checkpoint is refused instead of mixed in.
"""

import json
import math
import os
from pathlib import Path

import numpy as np

from jaxsim.errors import JaxsimInputError

FORMAT = 1


def _plain(v):
    """A row value as JSON (numpy scalars as Python numbers; floats round-trip exactly)."""
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def _lines(path: Path):
    """The JSON objects of a JSON-lines file; a last line cut by a kill is skipped."""
    if not path.is_file():
        return
    with open(path) as f:
        lines = f.read().split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            if i != len(lines) - 1:  # only an unterminated last line may be partial
                raise JaxsimInputError(str(path), f"line {i + 1} is not JSON", "the checkpoint is damaged: "
                                       "delete the folder to start the sweep over") from None


def _cut_partial_line(path: Path) -> None:
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


class SweepCheckpoint:
    """The checkpoint folder of one sweep.

    ``folder``: created when missing. ``fingerprint``: a string naming the sweep (the same
    command gives the same one). ``writer``: whether this process writes (process 0 of a
    multi-process sweep; the others only read). Raises :class:`JaxsimInputError` when the folder
    holds another sweep's checkpoint."""

    def __init__(self, folder, fingerprint: str, num_points: int, writer: bool = True):
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise JaxsimInputError("sweep.checkpoint", f"{self.folder} is a file, not a folder",
                                   "name a folder (it is created when missing)")
        self.manifest = self.folder / "manifest.jsonl"
        self.rows_path = self.folder / "rows.jsonl"
        self.writer = writer
        header = {"format": FORMAT, "fingerprint": fingerprint, "points": int(num_points)}
        if writer:  # a line cut by a kill is dropped, or the next append would continue it
            for path in (self.manifest, self.rows_path):
                _cut_partial_line(path)
        entries = list(_lines(self.manifest))
        if entries:
            head = entries[0]
            if {k: head.get(k) for k in header} != header:
                raise JaxsimInputError(
                    f"sweep.checkpoint ({self.folder})", "holds the checkpoint of another sweep "
                    f"({head.get('points')} points, fingerprint {head.get('fingerprint')!r}; this one: "
                    f"{num_points} points, {fingerprint!r})", "use another folder, or delete it to start over")
        elif writer:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._append(self.manifest, [header])
        self.done_chunks = [e for e in entries[1:] if "chunk" in e]

    def finished(self) -> dict:
        """``{configuration id: row}`` of every chunk the manifest lists (rows of unlisted chunks,
        written before a kill, are ignored; a row written twice counts once)."""
        ids = {int(i) for e in self.done_chunks for i in e["configs"]}
        rows = {}
        for r in _lines(self.rows_path):
            if int(r["config"]) in ids:
                rows[int(r["config"])] = r
        missing = ids - set(rows)
        if missing:
            raise JaxsimInputError(str(self.rows_path), f"the manifest lists configurations without a row: "
                                   f"{sorted(missing)[:5]}...", "the checkpoint is damaged: delete the folder "
                                   "to start the sweep over")
        return rows

    def record(self, chunk: int, rows: list, sim_s: float) -> None:
        """Append a finished chunk: its rows first (flushed to disk), then its manifest line."""
        if not self.writer:
            return
        self._append(self.rows_path, [_plain(r) for r in rows])
        entry = {"chunk": int(chunk), "configs": [int(r["config"]) for r in rows],
                 "sim_s": float(sim_s) if math.isfinite(sim_s) else 0.0}
        self._append(self.manifest, [entry])
        self.done_chunks.append(entry)

    @staticmethod
    def _append(path: Path, objs: list) -> None:
        with open(path, "a") as f:
            for o in objs:
                f.write(json.dumps(o) + "\n")
            f.flush()
            os.fsync(f.fileno())
