"""The yardstick: a plain PyTorch distillation loop, beside kdtool, from the same teacher checkpoint.

    python scripts/hand_loop.py runs/pipeline/<time>/train-teacher/best.pt --seeds 0 1 2

It uses kdtool only to read the data (the same training split, the same test images) and the
teacher; model, loss, optimizer, schedule and loop are written out here: a 784-256-256-10 ReLU
MLP, SGD (Nesterov, momentum 0.9, weight decay 5e-4) with torch's OneCycleLR stepped every
batch, 0.9 x T^2 KL(teacher_T || student_T) + 0.1 x CE. It prints the test errors of the student
alone and distilled for each seed; if kdtool's pipeline does worse from the same teacher, kdtool
has a bug or a bad default.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from kdtool.checkpoints import load_checkpoint
from kdtool.datasets import load_data
from kdtool.stages.common import classifier_from_checkpoint


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def train(images, labels, teacher_logits, seed: int, epochs: int, lr: float, temperature: float, soft: float,
          batch: int) -> nn.Module:
    torch.manual_seed(seed)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = (len(images) + batch - 1) // batch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=gen)
        for i in range(steps):
            idx = order[i * batch:(i + 1) * batch]
            out = model(images[idx])
            loss = F.cross_entropy(out, labels[idx])
            if teacher_logits is not None:
                kd = F.kl_div(F.log_softmax(out / temperature, 1), F.log_softmax(teacher_logits[idx] / temperature, 1),
                              log_target=True, reduction="batchmean") * temperature ** 2
                loss = soft * kd + (1 - soft) * loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("teacher", help="a kdtool teacher checkpoint (best.pt) trained on the embedded MNIST subset")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--soft", type=float, default=0.9)
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    ckpt = load_checkpoint(args.teacher)
    teacher = classifier_from_checkpoint(ckpt, torch.device("cpu"))
    data = load_data(ckpt["dataset"], seed=int(ckpt["config"].get("seed", 0)))
    x = data.train.images.float() / 255
    mean, std = torch.tensor(data.mean).view(1, -1, 1, 1), torch.tensor(data.std).view(1, -1, 1, 1)
    xn = (x - mean) / std
    xt = (data.test.images.float() / 255 - mean) / std
    with torch.no_grad():
        t_logits = torch.cat([teacher(x[i:i + 1000]) for i in range(0, len(x), 1000)])
        t_test = torch.cat([teacher(data.test.images[i:i + 1000].float() / 255) for i in range(0, len(xt), 1000)])
    print(f"teacher {ckpt['model']['name']}: {int((t_test.argmax(1) != data.test.labels).sum())} test errors "
          f"of {len(xt)}; training split {len(x)} images")
    results = {"alone": [], "distilled": []}
    for seed in args.seeds:
        for kind, targets in (("alone", None), ("distilled", t_logits)):
            t0 = time.perf_counter()
            model = train(xn, data.train.labels, targets, seed, args.epochs, args.lr, args.temperature, args.soft,
                          args.batch)
            with torch.no_grad():
                errors = int((model(xt).argmax(1) != data.test.labels).sum())
            results[kind].append(errors)
            print(f"seed {seed} {kind:9s}: {errors} test errors ({time.perf_counter() - t0:.0f} s)")
    for kind, errs in results.items():
        sd = statistics.stdev(errs) if len(errs) > 1 else 0.0
        print(f"{kind:9s}: {statistics.mean(errs):.1f} +- {sd:.1f} test errors over seeds {args.seeds}")


if __name__ == "__main__":
    main()
