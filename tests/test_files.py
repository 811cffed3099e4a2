"""pyactadd.files: temporary names that carry their writer's pid, and removing the leftovers
of writers that died."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from pyactadd.files import owner_pid, remove_stale_temps, sigint_held, temp_path


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_temp_path_carries_the_pid(tmp_path):
    temp = temp_path(tmp_path / "out.gguf")
    assert temp.parent == tmp_path and temp.name.startswith(".out.gguf.")
    assert owner_pid(temp) == os.getpid()
    assert owner_pid(tmp_path / "out.gguf") is None
    assert owner_pid(tmp_path / ".out.gguf.0123abcd.tmp") is None  # the old names: no pid


def test_remove_stale_temps_keeps_live_writers(tmp_path):
    alive = subprocess.Popen(["sleep", "60"])
    try:
        stale_file = tmp_path / f".a.gguf.{dead_pid()}-00ff.tmp"
        stale_dir = tmp_path / f".model.{dead_pid()}-0abc.tmp"
        live = tmp_path / f".b.gguf.{alive.pid}-00ff.tmp"
        mine = temp_path(tmp_path / "c.gguf")
        other = tmp_path / "keep.tmp"
        for path in (stale_file, live, mine, other):
            path.write_bytes(b"x")
        stale_dir.mkdir()
        (stale_dir / "weights.safetensors").write_bytes(b"x")
        removed = remove_stale_temps(tmp_path)
        assert sorted(removed) == sorted([stale_file, stale_dir])
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, mine.name, other.name])
        assert remove_stale_temps(tmp_path / "missing") == []
    finally:
        alive.kill()
        alive.wait()


def test_sigint_held_raises_after_the_call():
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with sigint_held():
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # Python code runs here (as llama.cpp's log callback does) and is not interrupted
                reached.append(1)
    assert len(reached) == 1000
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigint_held_outside_the_main_thread_does_nothing():
    done = []
    thread = threading.Thread(target=lambda: done.append(sigint_held().__enter__() is None))
    thread.start()
    thread.join()
    assert done == [True]
