"""The paper's protocol: RA's poisoned samples are never augmented; attacker and defender never share poisoned
images."""
import json
import os

import numpy as np
import pytest
import torch

from bdsafety.data.device import DeviceDataset, iterate_batches
from bdsafety.data.poisoned import PoisonedSplit
from bdsafety.errors import DataError
from bdsafety.pools import POOL_FILE, make_split, part_of, pool_split
from bdsafety.retune.ra import assemble_ra_set

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _split(n=40, length=200, seed=0):
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(length, n, replace=False))
    imgs = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    imgs[:, -3:, -3:, :] = 255  # a corner trigger a random crop would often cut away
    return PoisonedSplit(idx, imgs, np.zeros(n), rng.integers(0, 10, n), length)


def _capture(ds, epochs=6, augment=True):
    """Every batch the training loop would see, mapped back to dataset positions: {position: [image per epoch]}."""
    g = torch.Generator().manual_seed(0)
    seen = {}
    for _ in range(epochs):
        for xb, _y, idx in iterate_batches(ds, 16, shuffle=True, augment=augment, generator=g):
            for x, i in zip(xb, idx.tolist()):
                seen.setdefault(i, []).append(x.clone())
    return seen


@pytest.mark.parametrize("augment_poison", [False, True])
@pytest.mark.parametrize("draw", ["once", "redraw"])
def test_ra_clean_augmentation_drawn_once_or_redrawn_and_poison_bit_identical(draw, augment_poison):
    """augment_draw once (the official RA, default): each clean image enters every epoch with the SAME crop / flip
    (and the same one for every model retuned with the seed); redraw: a new one each epoch. The poisoned samples are
    the record's images in every batch (unless the augment_poison ablation)."""
    from types import SimpleNamespace

    from bdsafety.retune.ra import training_data

    rng = np.random.default_rng(1)
    train = DeviceDataset(rng.integers(0, 256, (60, 8, 8, 3), dtype=np.uint8), rng.integers(0, 10, 60))
    split = _split()
    ra = assemble_ra_set(train, split, np.arange(30), np.arange(5), augment_poison=augment_poison)
    cfg = SimpleNamespace(augment=True, augment_draw=draw, random_seed=0)
    data, loop_augments = training_data(ra, cfg, hflip=True)
    assert loop_augments == (draw == "redraw")
    seen = _capture(data, augment=loop_augments)
    clean, poison = range(30), range(30, 35)
    stored = torch.from_numpy(split.images[:5]).permute(0, 3, 1, 2)
    assert all(len(seen[p]) == 6 for p in range(35))
    changed_clean = sum(not torch.equal(x, train.x[p]) for p in clean for x in seen[p])
    assert changed_clean > 0  # the clean part is augmented in both modes
    varies = sum(any(not torch.equal(seen[p][0], x) for x in seen[p][1:]) for p in clean)
    if draw == "once":
        assert varies == 0  # one augmented version per clean image, the same in every epoch
        again, _ = training_data(ra, cfg, hflip=True)
        assert torch.equal(again.x, data.x)  # seeded: the same draw for every model retuned with this seed
        other, _ = training_data(ra, SimpleNamespace(augment=True, augment_draw=draw, random_seed=1), hflip=True)
        assert not torch.equal(other.x[:30], data.x[:30])
    else:
        assert varies >= 25  # redrawn: almost every clean image is seen in more than one version
    changed_poison = sum(not torch.equal(x, stored[p - 30]) for p in poison for x in seen[p])
    if augment_poison:
        assert changed_poison > 0  # the ablation augments them
    else:
        assert changed_poison == 0  # default: every draw of every poisoned sample is the record's image
    plain, loop_plain = training_data(ra, SimpleNamespace(augment=False, augment_draw=draw, random_seed=0), hflip=True)
    assert plain is ra.data and not loop_plain  # augment false: nothing is augmented


def test_ra_default_config_does_not_augment_poison():
    from bdsafety.registry import get

    cfg = get("retune", "ra").parse(["--result_file", "x",
                                     "--yaml_path", os.path.join(ROOT, "config/retune_attack/ra/demo.yaml")])
    assert cfg.augment_poison is False
    for ds in ("cifar10", "cifar100", "gtsrb", "tiny", "demo", "cifar100_paper", "tiny_paper"):
        c = get("retune", "ra").parse(["--result_file", "x",
                                       "--yaml_path", os.path.join(ROOT, f"config/retune_attack/ra/{ds}.yaml")])
        assert (c.augment, c.augment_draw, c.augment_poison) == (True, "once", False), ds  # the official RA
    assert get("retune", "ra").parse(["--result_file", "x"]).augment_draw == "once"
    for name in ("exact_purification", "pam"):
        assert get("defense", name).parse(["--result_file", "x"]).augment_poison is False


def test_pool_split_is_disjoint_deterministic_and_saved(tmp_path):
    split = _split()
    ps = pool_split(tmp_path, split)
    assert len(np.intersect1d(ps.attacker, ps.defender)) == 0
    assert sorted(np.concatenate([ps.attacker, ps.defender]).tolist()) == split.indices.tolist()
    saved = json.loads((tmp_path / POOL_FILE).read_text())
    assert saved["attacker"] == ps.attacker.tolist()
    again = pool_split(tmp_path, split)  # read back, same split
    assert again.attacker.tolist() == ps.attacker.tolist()
    assert make_split(split.indices).attacker.tolist() == ps.attacker.tolist()  # deterministic from the indices alone
    a, d = part_of(tmp_path, split, "attacker"), part_of(tmp_path, split, "defender")
    assert len(np.intersect1d(a.indices, d.indices)) == 0 and len(a) + len(d) == len(split)


def test_pool_split_of_other_samples_is_refused(tmp_path):
    pool_split(tmp_path, _split(seed=0))
    with pytest.raises(DataError, match="delete pool_split.json"):
        pool_split(tmp_path, _split(seed=3))
    (tmp_path / POOL_FILE).write_text("{not json")
    with pytest.raises(DataError, match="unreadable"):
        pool_split(tmp_path, _split(seed=0))


def test_a_hand_edited_pool_split_is_refused_when_read(tmp_path):
    split = _split()
    pool_split(tmp_path, split)
    saved = json.loads((tmp_path / POOL_FILE).read_text())
    saved["defender"] = saved["defender"] + saved["attacker"][:1]  # one poisoned sample for both sides
    (tmp_path / POOL_FILE).write_text(json.dumps(saved))
    with pytest.raises(DataError, match="in both parts"):
        pool_split(tmp_path, split)
    saved["defender"] = saved["defender"][:-2]  # and one sample in neither
    (tmp_path / POOL_FILE).write_text(json.dumps(saved))
    with pytest.raises(DataError, match="not the record's poisoned training samples"):
        pool_split(tmp_path, split)


def test_single_poisoned_sample_cannot_be_shared(tmp_path):
    one = _split(n=1)
    with pytest.raises(DataError, match="disjoint"):
        part_of(tmp_path, one, "attacker")


def test_ep_and_ra_draw_disjoint_poisoned_samples(demo_work):
    """End to end on the demo record: EP's and RA's saved index files never overlap."""
    from bdsafety.registry import get
    from bdsafety.retune.ra import main as ra_main

    cfg = os.path.join(ROOT, "config")
    get("defense", "exact_purification").main([
        "--result_file", str(demo_work.demo),
        "--yaml_path", os.path.join(cfg, "defense", "exact_purification", "demo.yaml"), "--epochs", "1",
        "--no_progress"])
    ep_dir = demo_work.demo / "defense" / "exact_purification"
    (out,) = ra_main(["--result_file", str(demo_work.demo), "--defense", "exact_purification", "--no_progress",
                      "--yaml_path", os.path.join(cfg, "retune_attack", "ra", "demo.yaml"), "--epochs", "1",
                      "--poison_num", "25"])
    ep_idx = np.loadtxt(ep_dir / "log" / "defender_poison_index.txt", dtype=np.int64, ndmin=1)
    ra_idx = np.loadtxt(out / "log" / "poison_index.txt", dtype=np.int64, ndmin=1)
    assert len(ep_idx) > 0 and len(ra_idx) == 25
    assert len(np.intersect1d(ep_idx, ra_idx)) == 0
    split = json.loads((demo_work.demo / POOL_FILE).read_text())
    assert set(ra_idx.tolist()) <= set(split["attacker"]) and set(ep_idx.tolist()) == set(split["defender"])


# ------------------------------------------------------------------------------------------- selection
def test_select_largest_within_tolerance_and_best():
    from bdsafety.selection import select

    c = [{"rho": 0.3, "val_acc": 0.95}, {"rho": 0.4, "val_acc": 0.94}, {"rho": 0.5, "val_acc": 0.90}]
    assert select(c, key="rho", tol=0.02)[0]["rho"] == 0.4
    assert select(c, key="rho", tol=0.10)[0]["rho"] == 0.5
    assert select(c, key="rho", criterion="best_val_acc")[0]["rho"] == 0.3
    with pytest.raises(Exception, match="val_ratio"):
        select([{"rho": 0.3, "val_acc": None}], key="rho")
    # relative drop against a reference model (ANP's threshold): (0.95 - 0.90) / 0.95 = 0.053 < 0.1, 0.84: 0.116 >= 0.1
    t = [{"t": 0.0, "val_acc": 0.96}, {"t": 0.1, "val_acc": 0.90}, {"t": 0.2, "val_acc": 0.84}]
    assert select(t, key="t", criterion="largest_within_drop", tol=0.1, reference=0.95)[0]["t"] == 0.1
    assert select(t, key="t", criterion="largest_within_drop", tol=0.2, reference=0.95)[0]["t"] == 0.2
    exact = [{"t": 0.0, "val_acc": 1.0}, {"t": 0.1, "val_acc": 0.75}]  # a drop of exactly 0.25 (binary fractions)
    assert select(exact, key="t", criterion="largest_within_drop", tol=0.25, reference=1.0)[0]["t"] == 0.0  # strict <
    # the same on counts that binary fractions cannot hold: 45/50 is a drop of exactly 0.1 (1.0 - 0.9 rounds below it)
    tenth = [{"t": 0.0, "val_acc": 1.0}, {"t": 0.8, "val_acc": 45 / 50}, {"t": 0.75, "val_acc": 48 / 50}]
    assert select(tenth, key="t", criterion="largest_within_drop", tol=0.1, reference=1.0)[0]["t"] == 0.75
    within = [{"rho": 0.3, "val_acc": 0.96}, {"rho": 0.5, "val_acc": 0.94}]  # exactly 0.02 below the best: inside
    assert select(within, key="rho", tol=0.02)[0]["rho"] == 0.5
    chosen, words = select(t[1:], key="t", criterion="largest_within_drop", tol=0.05, reference=1.0)
    assert chosen is None and "none qualifies" in words


def test_rho_select_needs_a_sweep_and_a_validation_split():
    from bdsafety.errors import ConfigError
    from bdsafety.registry import get

    m = get("defense", "pam")
    with pytest.raises(ConfigError, match="val_ratio"):
        m.expand(m.parse(["--result_file", "x", "--rho_sweep", "0.3,0.5", "--rho_select", "val"]))
    with pytest.raises(ConfigError, match="rho_sweep"):
        m.expand(m.parse(["--result_file", "x", "--rho_select", "val", "--val_ratio", "0.2"]))


def test_pam_rho_selected_on_validation_only(demo_work):
    """A tiny PAM sweep with rho_select val: the choice is made from the validation accuracies written by each run,
    which are recomputed here from the held-out reserved images of val_index.txt (never trained on)."""
    import yaml

    from bdsafety.experiment import open_experiment
    from bdsafety.registry import get
    from bdsafety.selection import val_accuracy

    short = ["--result_file", str(demo_work.demo), "--yaml_path", os.path.join(ROOT, "config/defense/pam/demo.yaml"),
             "--no_progress", "--n_rounds", "1", "--epochs", "1", "--bti_pretrain_epochs", "1",
             "--bti_mask_epochs", "1", "--bti_gen_epochs", "1", "--val_ratio", "0.2", "--rho_sweep", "0.2,0.6",
             "--rho_select", "val", "--save_name", "pamsel"]
    m = get("defense", "pam")
    outs = m.run_config(m.parse(short))
    sel = yaml.safe_load((demo_work.demo / "defense" / "pamsel_rho_selection.yaml").read_text())
    cands = {c["rho"]: c["val_acc"] for c in sel["candidates"]}
    assert set(cands) == {0.2, 0.6} and sel["rho"] in cands and "validation" in sel["data"]
    best = max(cands.values())
    assert sel["rho"] == max(r for r, v in cands.items() if v >= best - 0.02)
    # the recorded validation accuracies are those of the held-out reserved images (val_index.txt), not test data
    exp = open_experiment(get("defense", "pam").parse(["--result_file", str(demo_work.demo), "--no_progress"]))
    from bdsafety.records import load_model_result

    for out in outs:
        meta = yaml.safe_load((out / "config.yaml").read_text())
        vidx = np.loadtxt(out / "log" / "val_index.txt", dtype=np.int64, ndmin=1)
        tidx = np.loadtxt(out / "log" / "index.txt", dtype=np.int64, ndmin=1)
        assert len(np.intersect1d(vidx, tidx)) == 0  # never trained on
        model = exp.load_model(load_model_result(out / "defense_result.pt")["model"])
        assert abs(val_accuracy(model, exp.train.subset(vidx), exp.norm) - meta["val_acc"]) < 1e-6


@pytest.mark.slow
def test_anp_threshold_selected_on_validation_only(demo_work, monkeypatch, tmp_path):
    """ANP's threshold selection never receives test data: run twice, the second time with the test sets replaced by
    noise with random labels; masks, candidates and the chosen threshold are identical. The candidates' validation
    accuracies are those of the held-out reserved images (val_index.txt, never used to learn masks)."""
    import shutil

    import yaml

    import bdsafety.defenses.base as base
    from bdsafety import engine
    from bdsafety.experiment import open_experiment
    from bdsafety.records import load_model_result
    from bdsafety.registry import get
    from bdsafety.selection import val_accuracy

    rec = tmp_path / "rec" / "badnet_demo"
    shutil.copytree(demo_work.demo, rec, ignore=shutil.ignore_patterns("defense", "ra", "lmc_*"))
    argv = ["--result_file", str(rec), "--yaml_path", os.path.join(ROOT, "config/defense/anp/demo.yaml"),
            "--no_progress", "--nb_iter", "20", "--print_every", "20", "--pruning_sweep", "false"]
    m = get("defense", "anp")
    honest = m.main([*argv, "--save_name", "anp_a"])
    real_open = base.open_experiment

    def scrambled(cfg):
        exp = real_open(cfg)
        g = torch.Generator().manual_seed(123)
        ev = exp.evalsets

        def noise(ds):
            return DeviceDataset(torch.randint(0, 256, tuple(ds.x.shape), generator=g, dtype=torch.uint8),
                                 torch.randint(0, exp.num_classes, (len(ds),), generator=g), ds.device)

        exp.evalsets = engine.EvalSets(clean=noise(ev.clean), bd=noise(ev.bd), bd_orig_y=ev.bd_orig_y)
        return exp

    monkeypatch.setattr(base, "open_experiment", scrambled)
    blind = m.main([*argv, "--save_name", "anp_b"])
    a, b = (yaml.safe_load((o / "anp_threshold_selection.yaml").read_text()) for o in (honest, blind))
    assert a == b  # the same candidates, validation scores and choice
    assert (honest / "mask_values.txt").read_text() == (blind / "mask_values.txt").read_text()
    ma, mb = (yaml.safe_load((o / "config.yaml").read_text()) for o in (honest, blind))
    assert ma["after"]["test_acc"] != mb["after"]["test_acc"]  # the test data did differ
    assert (ma["n_pruned"], ma["pruning_threshold"]) == (mb["n_pruned"], mb["pruning_threshold"])
    # the validation accuracies: the held-out reserved images, disjoint from the mask-learning ones
    vidx = np.loadtxt(honest / "log" / "val_index.txt", dtype=np.int64, ndmin=1)
    tidx = np.loadtxt(honest / "log" / "index.txt", dtype=np.int64, ndmin=1)
    assert len(vidx) == round(0.2 * (len(vidx) + len(tidx))) and len(np.intersect1d(vidx, tidx)) == 0
    monkeypatch.setattr(base, "open_experiment", real_open)
    exp = open_experiment(m.parse(["--result_file", str(rec), "--no_progress"]))
    out_model = exp.load_model(load_model_result(honest / "defense_result.pt")["model"])
    chosen = (next(c for c in a["candidates"] if c["threshold"] == a["threshold"]) if a["threshold"] is not None
              else None)
    want = chosen["val_acc"] if chosen else a["val_acc_unpruned"]
    assert abs(val_accuracy(out_model, exp.train.subset(vidx), exp.norm) - want) < 1e-9
    assert abs(val_accuracy(exp.backdoored_model(), exp.train.subset(vidx), exp.norm) - a["val_acc_unpruned"]) < 1e-9


def test_ra_budget_figure_from_its_command(demo_work, fst_after_ra):
    """analysis/ra_budget.py: one RA run per (defense, poison_num), a tidy csv and the figure."""
    import pandas as pd

    from bdsafety.analysis.ra_budget import main as budget_main

    rc = budget_main(["--result_file", str(demo_work.demo), "--defense", "fst", "--poison_nums", "1,3", "--no_progress",
                      "--epochs", "2", "--yaml_path", os.path.join(ROOT, "config/retune_attack/ra/demo.yaml")])
    assert rc == 0
    dest = demo_work.demo / "ra_budget"
    t = pd.read_csv(dest / "ra_budget.csv")
    assert set(t["poison_num"]) == {1, 3} and set(t["defense"]) == {"fst"}
    assert (dest / "ra_budget.png").stat().st_size > 1000
    for n in (1, 3):
        idx = np.loadtxt(demo_work.demo / "defense" / "fst" / f"ra_budget_p{n}" / "log" / "poison_index.txt", ndmin=1)
        assert len(idx) == n
    assert budget_main(["--result_file", str(demo_work.demo), "--poison_nums", "0"]) == 2  # a clear error, exit 2
