"""Memory caps: the cgroup limit the hardware probe honours (so plans and predictions use what this
process may really use), and the benchmark's own verified, measured and removed cap."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from optdemo.system.cgroup import memory_limit
from tools.bench import REPO_ROOT
from tools.memcap import V1_MEMORY, CapError, MemoryCap

GIB = 2**30
can_cap = (V1_MEMORY / "memory.limit_in_bytes").exists() and os.access(V1_MEMORY, os.W_OK)
needs_cgroups = pytest.mark.skipif(not can_cap, reason="needs a writable cgroup v1 memory controller (root)")


def _group(root: Path, path: str, files: dict[str, str]) -> None:
    folder = root / path.strip("/")
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)


def test_the_tightest_limit_up_the_hierarchy_v1(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("4:memory:/outer/inner\n9:name=systemd:/\n")
    base = tmp_path / "fs" / "memory"
    _group(base, "", {"memory.limit_in_bytes": "9223372036854771712", "memory.usage_in_bytes": "5"})
    _group(base, "outer", {"memory.limit_in_bytes": str(8 * GIB), "memory.usage_in_bytes": str(GIB)})
    inner = {"memory.limit_in_bytes": str(4 * GIB), "memory.usage_in_bytes": str(3 * GIB)}
    _group(base, "outer/inner", {**inner, "memory.stat": f"cache {GIB // 2}\nrss {GIB}\n"})
    limit = memory_limit(str(proc), tmp_path / "fs")
    # Page cache the group holds is room the kernel gives back: 4 - (3 - 0.5) GiB.
    assert (limit.limit_bytes, limit.group) == (4 * GIB, "/outer/inner")
    assert limit.headroom_bytes == GIB + GIB // 2


def test_v2_and_no_limit(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("0::/app\n")
    _group(tmp_path / "fs", "app", {"memory.max": str(2 * GIB), "memory.current": str(GIB // 2)})
    limit = memory_limit(str(proc), tmp_path / "fs")
    assert (limit.limit_bytes, limit.headroom_bytes) == (2 * GIB, GIB + GIB // 2)
    (tmp_path / "fs" / "app" / "memory.max").write_text("max\n")
    assert memory_limit(str(proc), tmp_path / "fs") is None
    assert memory_limit(str(tmp_path / "missing"), tmp_path / "fs") is None


def test_the_cap_refuses_what_it_cannot_do(tmp_path):
    with pytest.raises(CapError, match="cgroup v1 memory controller"):
        MemoryCap(GIB, root=tmp_path)


@needs_cgroups
def test_a_capped_process_plans_with_its_cap():
    probe = "from optdemo.system.hardware import probe_hardware as p; h = p(); "
    probe += "print(h.ram_total_bytes, h.ram_available_bytes)"
    with MemoryCap(GIB) as cap:
        assert cap.report().limit_bytes == GIB  # read back from the kernel
        done = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO_ROOT,
            preexec_fn=cap.join(), check=True,
        )  # fmt: skip
        total, available = map(int, done.stdout.split())
        peak = cap.report().peak_bytes
        group = cap.group
    assert total == GIB and 0 < available < GIB
    assert 0 < peak <= GIB
    assert not group.exists()  # removed afterwards
