"""The weight cache of pyactadd.extract.torch_model: what a run killed outright leaves behind."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pyactadd.extract.torch_model import cache_entry


@pytest.mark.usefixtures("torch_model")  # the cache entry exists: the load below reads it back
def test_next_load_removes_half_written_entries_of_dead_runs(default_model_path):
    # A SIGKILL during the first conversion leaves the temporary folder (hundreds of MB) behind;
    # its name carries the writer's pid, and the next load removes it once that process is gone.
    torch_dir = cache_entry(default_model_path).parent
    dead = subprocess.Popen(["true"])
    dead.wait()
    alive = subprocess.Popen(["sleep", "60"])
    stale = torch_dir / f".{cache_entry(default_model_path).name}.{dead.pid}-00ff00ff00ff00ff.tmp"
    in_use = torch_dir / f".{cache_entry(default_model_path).name}.{alive.pid}-00ff00ff00ff00ff.tmp"
    try:
        for folder in (stale, in_use):
            folder.mkdir()
            (folder / "model.safetensors").write_bytes(b"half written")
        code = "import sys; from pyactadd.extract.torch_model import load_torch_model; load_torch_model(sys.argv[1])"
        subprocess.run([sys.executable, "-c", code, str(default_model_path)], check=True, timeout=300)
        assert not stale.exists()
        assert (in_use / "model.safetensors").is_file()  # its writer is still running
    finally:
        alive.kill()
        alive.wait()
        for folder in (stale, in_use):
            if folder.exists():
                (folder / "model.safetensors").unlink()
                folder.rmdir()
