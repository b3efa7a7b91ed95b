"""``benchmarks/_stack.py``'s CPU limit, which ``benchmarks/scale_out.py --cores-each`` uses to give
each service process a machine of its own size: a process that would keep a core busy is held to
the cores it is given, and its group is gone at the end."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import _stack as stack  # noqa: E402  (benchmarks/ is a script directory, not a package)

SPIN = "import time\nend = time.monotonic() + 30\nwhile time.monotonic() < end: pass\n"


def test_a_limited_process_gets_the_cores_it_is_given_and_its_group_is_removed() -> None:
    assert stack.cgroup_cpu_root() is not None, "the benchmarks' CPU limit needs root and a cgroup cpu controller"
    spinner = subprocess.Popen([sys.executable, "-c", SPIN])
    try:
        with stack.cpu_limited(spinner.pid, 0.2, "test") as limit:
            group = limit.group
            assert str(spinner.pid) in (group / "cgroup.procs").read_text().split()
            before, periods_before = stack.cpu_seconds(spinner.pid), limit.periods()
            start = time.monotonic()
            time.sleep(1.5)
            used = (stack.cpu_seconds(spinner.pid) - before) / (time.monotonic() - start)
            periods, throttled = (a - b for a, b in zip(limit.periods(), periods_before, strict=True))
        # Alone, the loop keeps a core busy; held to a fifth of one it gets no more than that (less
        # when other work shares the cores), and the kernel counts the periods the limit stopped it.
        assert 0.02 < used < 0.35, used
        assert periods >= 5 and throttled >= 1, (periods, throttled)
        assert not group.exists()
        assert spinner.poll() is None  # moved back out, still running
    finally:
        spinner.kill()
        spinner.wait()
