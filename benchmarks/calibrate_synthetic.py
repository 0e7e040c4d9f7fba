"""Calibrate the synthetic dataset's ``difficulty`` on a VALIDATION split (never the test split).

For each difficulty: generate the synthetic training split (``--n_train`` images), hold out its last ``--n_val``
images, train a clean model on the rest with the project's own training loop (``engine.fit``: the attack yaml's
optimizer, lr, momentum, weight decay, scheduler, batch size and the attack's augmentation, random crop; the
synthetic dataset has no flip augmentation) for ``--epochs`` epochs, and print the held-out accuracy. The test split
is generated (the generator draws it after the training split) but never read.

    python benchmarks/calibrate_synthetic.py --model cnn_tiny --difficulties 0 0.3 0.5 0.7 --epochs 15 \
        --n_train 50000 --n_val 5000 --threads 1

Every run is seeded (data seed 0, training seed 0): the same command prints the same accuracies.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from bdsafety import engine
from bdsafety.config import read_yaml
from bdsafety.data.device import DeviceDataset, Normalizer
from bdsafety.data.synthetic import make_synthetic
from bdsafety.models import build_model


def validation_accuracy(difficulty: float, *, model_name: str, n_train: int, n_val: int, hp: dict, epochs: int,
                        seed: int = 0, data_seed: int = 0) -> tuple[float, float, float]:
    """(validation accuracy, training accuracy of the last epoch, seconds of training) of a clean model."""
    data = make_synthetic(n_train=n_train, n_test=10, seed=data_seed, difficulty=difficulty)
    fit_x, fit_y = data.train_x[:-n_val], data.train_y[:-n_val]
    val = DeviceDataset(data.train_x[-n_val:], data.train_y[-n_val:])
    gen = engine.seed_everything(seed)
    model = build_model(model_name, 10, data.info.img_size)
    opt = engine.make_optimizer(model.parameters(), hp["client_optimizer"], hp["lr"], hp["sgd_momentum"], hp["wd"])
    sched = engine.make_scheduler(opt, hp["lr_scheduler"], epochs, hp.get("steplr_milestones", ()))
    norm = Normalizer(data.info)
    start = time.perf_counter()
    rows = engine.fit(model, DeviceDataset(fit_x, fit_y), norm=norm, epochs=epochs, batch_size=hp["batch_size"],
                      step_fn=engine.sgd_step(opt), scheduler=sched, optimizer=opt, hflip=data.info.hflip,
                      generator=gen, progress=False)
    seconds = time.perf_counter() - start
    _, acc = engine.evaluate_loss_acc(model, val, norm)
    return float(acc), rows[-1]["train_acc"], seconds


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cnn_tiny")
    p.add_argument("--difficulties", type=float, nargs="+", default=[0.0, 0.3, 0.5, 0.7])
    p.add_argument("--attack_yaml", default="config/attack/badnet/cifar10.yaml",
                   help="optimizer / lr / momentum / wd / scheduler / batch size come from here (epochs: --epochs)")
    p.add_argument("--epochs", type=int, default=None, help="default: the yaml's")
    p.add_argument("--n_train", type=int, default=50000, help="synthetic training split size (validation included)")
    p.add_argument("--n_val", type=int, default=5000, help="held out from the end of the training split")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    a = p.parse_args(argv)
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    hp = read_yaml(a.attack_yaml)
    epochs = a.epochs or int(hp["epochs"])
    print(f"model {a.model}, {a.n_train - a.n_val} training / {a.n_val} validation images, {epochs} epochs, "
          f"{hp['client_optimizer']} lr {hp['lr']} momentum {hp['sgd_momentum']} wd {hp['wd']} {hp['lr_scheduler']}, "
          f"batch {hp['batch_size']} (from {a.attack_yaml}), torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("difficulty  val_acc  train_acc  train_s")
    for d in a.difficulties:
        acc, train_acc, sec = validation_accuracy(d, model_name=a.model, n_train=a.n_train, n_val=a.n_val, hp=hp,
                                                  epochs=epochs)
        print(f"{d:10.2f}  {acc:7.4f}  {train_acc:9.4f}  {sec:7.0f}", flush=True)


if __name__ == "__main__":
    main()
