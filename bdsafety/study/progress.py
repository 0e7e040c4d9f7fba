"""Where a running study is: jobs done / total, the jobs running now, and an estimated time left.

The estimate: each job still to run costs the mean wall time of the finished jobs of its method (of all finished
jobs when none of its method has finished), and the jobs run side by side at the concurrency measured so far (the
finished jobs' summed wall time over the elapsed time, at least 1). It is printed with every finished job and written
to ``study.json`` (``state: running``) after each, so a user can watch a long grid from another shell; the finished
study overwrites ``study.json`` with its summary (``state: finished``).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from bdsafety.safeio import atomic_write_text


class StudyProgress:
    def __init__(self, todo: list, report_dir: Path, t0: float | None = None):
        """``report_dir``: the folder of the study's own files (logs/, study.json)."""
        self.todo = {j.key: j.method for j in todo}
        self.report_dir = Path(report_dir)
        self.t0 = time.time() if t0 is None else t0
        self.walls: dict[str, list] = {}  # method -> wall times of its finished jobs
        self.finished: set = set()

    def record(self, result: dict) -> None:
        key = result["key"]
        self.finished.add(key)
        if result.get("status") == "ran" and key in self.todo:
            self.walls.setdefault(self.todo[key], []).append(float(result.get("wall_s") or 0.0))

    def running(self) -> list:
        """Keys of the jobs whose start marker is there now (bdsafety.study.execute writes logs/<job>.started)."""
        logs = self.report_dir / "logs"
        if not logs.is_dir():
            return []
        return sorted(p.with_suffix("").name.replace("__", "/") for p in logs.glob("*.started"))

    def eta_s(self, now: float | None = None) -> float | None:
        """Seconds left, or None before any job has finished (nothing to estimate from)."""
        every = [w for ws in self.walls.values() for w in ws]
        if not every:
            return None
        mean_all = sum(every) / len(every)
        left = [m for k, m in self.todo.items() if k not in self.finished]
        cost = sum(sum(self.walls[m]) / len(self.walls[m]) if m in self.walls else mean_all for m in left)
        elapsed = max(1e-9, (time.time() if now is None else now) - self.t0)
        concurrency = max(1.0, sum(every) / elapsed)
        return cost / concurrency

    def state(self) -> dict:
        eta = self.eta_s()
        return {"state": "running", "done": len(self.finished & set(self.todo)), "total": len(self.todo),
                "running": self.running(), "elapsed_s": round(time.time() - self.t0, 1),
                "eta_s": None if eta is None else round(eta, 1)}

    def write(self) -> None:

        atomic_write_text(self.report_dir / "study.json", json.dumps(self.state(), indent=1))


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "eta ?"
    if seconds < 90:
        return f"eta {seconds:.0f}s"
    if seconds < 5400:
        return f"eta {seconds / 60:.0f}m"
    return f"eta {seconds / 3600:.1f}h"
