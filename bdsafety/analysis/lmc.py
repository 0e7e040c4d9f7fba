"""Linear mode connectivity along the backdoor-connected path.

For alpha on a grid in [0, 1]: theta(alpha) = (1 - alpha) * theta_def + alpha * theta_bd over the parameters.
BatchNorm running statistics cannot be interpolated meaningfully, so by default they are recomputed at each
point on the defender's reserved clean data (bn='recompute'); bn='interpolate' interpolates the buffers
instead. At each point: clean loss / accuracy and backdoor loss / ASR / backdoor error (1 - ASR).

The paper's explanation of superficial safety: along this path a superficially purified model falls back into
the backdoor basin almost immediately (ASR jumps at small alpha), while a robust one (EP, PAM) keeps a high
backdoor error far along it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from bdsafety import engine
from bdsafety.config import AMOUNT, FRACTION, POS_INT, Option, float_list, str_list
from bdsafety.experiment import RECORD_SCHEMA, Output, RecordRun, reserved_indices
from bdsafety.records import list_defenses
from bdsafety.registry import get, name_list, register

LMC_SCHEMA = {
    **RECORD_SCHEMA,
    "defense": Option(["all"], "defense folders to analyse (comma list) or 'all'", type=str_list),
    "points": Option(21, "number of alpha values on [0, 1]", check=POS_INT),
    "alphas": Option(None, "explicit alpha values (overrides points)", type=float_list, check=FRACTION),
    "bn": Option("recompute", "BatchNorm buffers at each point", choices=("recompute", "interpolate")),
    "ratio": Option(0.05, "reserved clean data for BN statistics: ratio (<1) or count", check=AMOUNT),
    "bn_batch_size": Option(256, "batch size of the BN-statistics pass", check=POS_INT),
    "save_name": Option("lmc", "output folder name under the record", kind="folder_name"),
}


def interpolate_state(sd_a: dict, sd_b: dict, alpha: float, interpolate_buffers: bool, param_names: set) -> dict:
    """(1 - alpha) * a + alpha * b for parameters (and float buffers if asked); other entries from a."""
    out = {}
    for k, va in sd_a.items():
        vb = sd_b[k]
        if va.is_floating_point() and (k in param_names or interpolate_buffers):
            out[k] = torch.lerp(va, vb, alpha)
        else:
            out[k] = va.clone()
    return out


def lmc_path(exp, theta_def: dict, theta_bd: dict, alphas, bn: str, reserved, bn_batch_size: int = 256,
             progress: bool = True) -> pd.DataFrame:
    """Metrics at each alpha of the path from theta_def (alpha 0) to theta_bd (alpha 1)."""

    model = exp.new_model()
    param_names = {n for n, _ in model.named_parameters()}
    rows = []
    for a in tqdm(list(alphas), desc="LMC path", disable=not engine.use_progress(progress), leave=False):
        model.load_state_dict(interpolate_state(theta_def, theta_bd, float(a), bn == "interpolate", param_names))
        if bn == "recompute":
            engine.recompute_bn_stats(model, reserved, exp.norm, bn_batch_size)
        m = exp.metrics(model)
        rows.append({"alpha": float(a), "clean_loss": m["test_loss"], "clean_acc": m["test_acc"],
                     "backdoor_loss": m.get("bd_test_loss", np.nan), "asr": m.get("test_asr", np.nan),
                     "backdoor_error": 1 - m.get("test_asr", np.nan)})
    return pd.DataFrame(rows)


def lmc_figure(curves: dict[str, pd.DataFrame], title: str = ""):
    """The LMC figure (lmc.png): backdoor error and clean accuracy along the path, one line per defense."""
    import matplotlib  # lazy: matplotlib is heavy and only needed for figures

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: matplotlib is heavy and only needed for figures

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, df in curves.items():
        axes[0].plot(df["alpha"], 100 * df["backdoor_error"], marker=".", label=name)
        axes[1].plot(df["alpha"], 100 * df["clean_acc"], marker=".", label=name)
    axes[0].set_ylabel("backdoor error = 1 - ASR (%)")
    axes[1].set_ylabel("clean accuracy (%)")
    for ax in axes:
        ax.set_xlabel("alpha  (0 = defended model, 1 = backdoored model)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title or "Linear mode connectivity along the backdoor-connected path")
    fig.tight_layout()
    return fig


def lmc_outputs(exp, cfg) -> dict[str, Path]:
    """LMC's one output folder, <record>/<save_name>/ (after checking the defense folders it is asked for exist)."""
    _defenses(exp, cfg)
    return {"lmc": exp.record_dir / cfg.save_name}


def _defenses(exp, cfg) -> list[str]:
    return name_list(cfg.defense, list_defenses(exp.record_dir), what=f"defense folder of record {exp.record_dir.name}",
                     hint=f"run e.g. python defense/fst.py --result_file {exp.record_dir.name} first")


def run_lmc(ctx: RecordRun):
    """The path from each defended model to the backdoored one; yields ('lmc', its Output: lmc.csv, lmc.png)."""
    exp, cfg = ctx.exp, ctx.cfg
    names = _defenses(exp, cfg)
    alphas = cfg.alphas if cfg.alphas else np.linspace(0, 1, cfg.points)
    idx = reserved_indices(exp.data.train_y, cfg.ratio, seed=cfg.random_seed)
    reserved = exp.train.subset(idx)
    theta_bd = {k: v.to(exp.device) for k, v in exp.backdoored_model().state_dict().items()}
    curves = {}
    for n in names:
        theta_def = exp.model_from_file(exp.record_dir / "defense" / n / "defense_result.pt").state_dict()
        curves[n] = lmc_path(exp, theta_def, theta_bd, alphas, cfg.bn, reserved, cfg.bn_batch_size, exp.progress)
        print(f"[lmc] {n}: ASR at alpha=0 {curves[n]['asr'].iloc[0]:.3f}, at alpha=0.5 "
              f"{np.interp(0.5, curves[n]['alpha'], curves[n]['asr']):.3f}, at alpha=1 {curves[n]['asr'].iloc[-1]:.3f}")
    table = pd.concat([df.assign(defense=n) for n, df in curves.items()], ignore_index=True)
    fig = lmc_figure(curves, f"{exp.record_dir.name}: LMC (BN {cfg.bn})")
    yield "lmc", Output("lmc", artifacts={"lmc.csv": table, "lmc.png": fig}, indices={"index": idx},
                        info=dict(bn=cfg.bn, defenses=names))


def study_summary(folder: Path) -> dict:
    """LMC's columns of a study's results.csv: ASR / C-Acc halfway (alpha 0.5) along the path defended -> backdoored
    model (linear interpolation of the measured points); NaN when not run."""
    f = folder / "lmc.csv"
    if not f.is_file():
        return {"lmc_asr_mid": float("nan"), "lmc_acc_mid": float("nan")}
    df = pd.read_csv(f).sort_values("alpha")
    return {"lmc_asr_mid": float(np.interp(0.5, df["alpha"], df["asr"])),
            "lmc_acc_mid": float(np.interp(0.5, df["alpha"], df["clean_acc"]))}


register("analysis", "lmc", schema=lambda: dict(LMC_SCHEMA), needs=("defense",), configs=("demo",), on=("defense",),
         summary=study_summary, outputs=lmc_outputs,
         description="LMC analysis along the backdoor-connected path")(run_lmc)


def main(argv=None) -> Path:
    """``python analysis/lmc.py ...`` without the CLI error handling (tests, notebooks)."""

    (out,) = get("analysis", "lmc").main(argv)
    return out
