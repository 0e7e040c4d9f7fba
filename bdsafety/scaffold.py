"""The one run scaffold: how a registered method is run and how its outputs are written.

    registry.get("defense", "pam").main(argv)   # parse -> scaffold.run -> the kind's runner

Runners by kind: attacks ``bdsafety.attacks.base.run_attack`` (writes a record), defenses
``bdsafety.defenses.base.run_defense`` (writes defense/<folder>/); retuning attacks and analyses run their own
function on an opened record and write each output with ``write_output``. Every output goes through
``bdsafety.outputs.OutputFolder`` (built aside, moved into place when complete).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np


def run(method, cfg: SimpleNamespace):
    """Run a registered method with a resolved config (its ``resolve`` hook, if any, fills dependent values first), at
    the config's precision and eval_subset (set once here for the whole run, restored afterwards:
    bdsafety.engine.precision, bdsafety.engine.eval_subset)."""
    from bdsafety.engine import eval_subset, precision

    if method.resolve is not None:
        cfg = method.resolve(cfg)
    with precision(getattr(cfg, "precision", "fp32")), eval_subset(getattr(cfg, "eval_subset", 0)):
        return _run(method, cfg)


def _run(method, cfg: SimpleNamespace):
    if method.kind == "attack":
        from bdsafety.attacks.base import run_attack

        return run_attack(method, cfg)
    if method.kind == "defense":
        from bdsafety.defenses.base import run_defense

        if method.expand is None:
            return run_defense(method, cfg)
        cfgs = method.expand(cfg)
        outs = [run_defense(method, c) for c in cfgs]
        if method.select is not None and len(cfgs) > 1:
            method.select(cfg, outs)
        return outs
    return method.run(cfg)


@dataclass
class Output:
    """One output folder's content: written by ``write_output`` into an OutputFolder."""

    name: str  # run name: <name>_df.csv, <name>_df_summary.csv
    rows: list[dict] | None = None  # metrics per epoch (None: no csv)
    model_state: dict | None = None  # state_dict saved as ``model_file`` with model_name / num_classes
    model_file: str | None = None  # 'defense_result.pt', 'ra_result.pt'
    artifacts: dict[str, Any] = field(default_factory=dict)  # file name -> value (bdsafety.outputs.write_artifact)
    indices: dict[str, np.ndarray] = field(default_factory=dict)  # log/<key>.txt ('index' is BackdoorBench's index.txt)
    info: dict[str, Any] = field(default_factory=dict)  # extra values for config.yaml
    log_lines: list[str] = field(default_factory=list)


def write_output(folder: Path, out: Output, exp, cfg: SimpleNamespace, t0: float) -> None:
    """Write ``out`` into the (temporary) folder ``folder`` of an OutputFolder."""
    from bdsafety.experiment import write_run_files
    from bdsafety.outputs import write_artifact
    from bdsafety.records import save_model_result

    folder = Path(folder)
    if out.model_state is not None:
        save_model_result(folder / (out.model_file or "model_result.pt"), out.model_state, exp.model_name, exp.num_classes)
    for fname, value in out.artifacts.items():
        write_artifact(folder / fname, value)
    for key, arr in out.indices.items():
        if key != "index":
            write_artifact(folder / "log" / f"{key}.txt", "".join(f"{int(i)}\n" for i in np.asarray(arr).ravel()))
    write_run_files(folder, out.name, cfg, exp.device, t0, out.rows, index=out.indices.get("index"),
                    log_lines=out.log_lines, **out.info)


def elapsed(t0: float) -> str:
    return f"{time.time() - t0:.0f}s"
