"""Fault injection at every write (issue 20), as SQLite's tests fail every I/O call in turn: `Writes` sees each write
(and which files are read) in one directory (a file opened for writing, a rename, a safetensors save, a torch.save) and can make the N-th one
fail as a full disk or a read-only file system does, with the error the real call gives there (read off a full and a
read-only tmpfs). A full disk leaves what it leaves in reality: an opened file exists, empty; torch.save's zip is cut
short. Each write is failed in a forked child of one run, so that the work before it is done once
(tests/system/test_fault_injection.py)."""

from __future__ import annotations

import builtins
import errno
import io
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch.serialization
from safetensors import SafetensorError

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT
CHILD_SECONDS = 120  # a child failing one write that takes longer has hung


def wait(pid: int) -> int | str:
    """A child's exit code, or "hung" (then killed)."""
    deadline = time.monotonic() + CHILD_SECONDS
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return "hung"


@dataclass(frozen=True)
class Write:
    stage: str
    kind: str
    path: str  # relative to the watched directory; a temporary name's random part as "*"


def raised(kind: str, code: int, path: str) -> BaseException:
    """What the real call raises when the disk is full (ENOSPC) or the file system read-only (EROFS)."""
    text = os.strerror(code)
    if kind == "safetensors":
        return SafetensorError(f"Error while serializing: I/O error: {text} (os error {code})")
    if kind == "torch.save":
        return RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598" if code == errno.ENOSPC
                            else f"[enforce fail at inline_container.cc:747] . open file failed with strerror: {text}")
    return OSError(code, text, path)


class Writes:
    """Records every write under `root` (in `self.seen`, tagged with `self.stage`, which the caller keeps current)
    and every file read there before being written (`self.read`). With `fork` (an errno), every write forks the process first: the child
    fails that write with the error (`self.child` is then its index) and goes on as the failing command would, to be
    checked and ended by the caller; the parent waits for it (`self.exits`), keeps the directory the child left in
    place/N/run, and goes on with the write as if nothing happened."""

    def __init__(self, root: Path, fork: int | None = None, place: Path | None = None, after_fork=None):
        self.root = Path(root).resolve()
        self.fork, self.place, self.after_fork = fork, place, after_fork
        self.stage = "create"
        self.seen: list[Write] = []
        self.read: set[str] = set()
        self.child: int | None = None
        self.exits: dict[int, int | str] = {}

    def _inside(self, path) -> str | None:
        if isinstance(path, int):  # os.fdopen: the descriptor's open was already seen
            return None
        try:
            relative = str(Path(os.fsdecode(path)).resolve().relative_to(self.root))
        except ValueError:
            return None
        return re.sub(r"(^|/)(\.[^/]+?)\.\w{8}(\.tmp)?(?=/|$)", r"\1\2.*\3", relative)  # mkstemp's and mkdtemp's names

    def _read(self, path) -> None:
        """Record a file read as the command's input: one it wrote itself first is not."""
        if (relative := self._inside(path)) is not None and all(w.path != relative for w in self.seen):
            self.read.add(relative)

    def _write(self, kind: str, path, leave=None) -> None:
        """Record a write; in a forking parent, fork: the child raises what the write would (after `leave()`, what
        a full disk leaves behind)."""
        relative = self._inside(path)
        if relative is None:
            return
        self.seen.append(Write(self.stage, kind, relative))
        if self.fork is None or self.child is not None:
            return
        n = len(self.seen) - 1
        self.place.mkdir(parents=True, exist_ok=True)  # the child reports there
        intact = self.root.with_name(self.root.name + ".intact")
        if self.root.exists():
            shutil.copytree(self.root, intact)
        pid = os.fork()
        if pid == 0:
            self.child = n
            if self.after_fork:
                self.after_fork()
            if leave is not None and self.fork == errno.ENOSPC:
                leave()
            raise raised(kind, self.fork, os.fsdecode(path))
        self.exits[n] = wait(pid)
        (self.place / str(n)).mkdir(parents=True)
        if self.root.exists():
            self._rename(self.root, self.place / str(n) / "run")
        if intact.exists():
            self._rename(intact, self.root)

    def __enter__(self) -> Writes:
        real_open, real_os_open, real_replace, real_rename = builtins.open, os.open, os.replace, os.rename
        self._rename = real_rename  # the parent's own moves are none of the run's writes
        real_serialize, real_zip_writer = safetensors.torch.serialize_file, torch.serialization._open_zipfile_writer
        real_safe_open = safetensors.torch.safe_open

        def cut_zip(path):  # torch.save's zip, cut short by the full disk
            with real_open(path, "wb") as f:
                f.write(b"PK\x03\x04" + bytes(60))

        def open_(file, mode="r", *args, **kwargs):
            if any(m in mode for m in "wax+"):
                # a full disk leaves a file opened to be written empty, one opened to add to as it was
                self._write("open", file, leave=lambda: real_open(file, "ab" if "a" in mode or "+" in mode else "wb").close())
            else:
                self._read(file)
            return real_open(file, mode, *args, **kwargs)

        def os_open(path, flags, *args, **kwargs):
            if flags & WRITE_FLAGS:
                self._write("open", path)  # a temporary file: failing to create it leaves nothing
            return real_os_open(path, flags, *args, **kwargs)

        def rename(real):
            def renamed(src, dst, *args, **kwargs):
                self._write("rename", dst)
                return real(src, dst, *args, **kwargs)
            return renamed

        def serialize_file(tensors, filename, *args, **kwargs):
            self._write("safetensors", filename)  # written to a temporary file and renamed: nothing is left
            return real_serialize(tensors, filename, *args, **kwargs)

        def safe_open(filename, *args, **kwargs):  # safetensors.torch.load_file's reader
            self._read(filename)
            return real_safe_open(filename, *args, **kwargs)

        def zip_writer(name_or_buffer):
            if isinstance(name_or_buffer, (str, os.PathLike)):
                self._write("torch.save", name_or_buffer, leave=lambda: cut_zip(name_or_buffer))
            return real_zip_writer(name_or_buffer)

        self._undo = [(builtins, "open", real_open), (io, "open", real_open), (os, "open", real_os_open),
                      (os, "replace", real_replace), (os, "rename", real_rename),
                      (safetensors.torch, "serialize_file", real_serialize), (safetensors.torch, "safe_open", real_safe_open),
                      (torch.serialization, "_open_zipfile_writer", real_zip_writer)]
        for module, name, new in [(builtins, "open", open_), (io, "open", open_), (os, "open", os_open),
                                  (os, "replace", rename(real_replace)), (os, "rename", rename(real_rename)),
                                  (safetensors.torch, "serialize_file", serialize_file), (safetensors.torch, "safe_open", safe_open),
                                  (torch.serialization, "_open_zipfile_writer", zip_writer)]:
            setattr(module, name, new)
        return self

    def __exit__(self, *exc) -> None:
        if self.child is not None:  # a forked child the caller did not end: it must never go on into the test session
            os._exit(70)
        for module, name, real in self._undo:
            setattr(module, name, real)
