"""A DataLoader training loop whose workers ringpool starts (audience: torch users).

Run: python examples/python/dataloader_training.py [--epochs N] [--workers N]

The dataset is synthetic (y = 3x - 1 plus noise), so the example needs nothing but torch. The only
ringpool line is the context: a zygote that preloaded what this script imported (torch) forks each
DataLoader worker, so workers start in milliseconds instead of re-importing torch as spawn would.
"""
import argparse

import torch
from torch.utils.data import DataLoader, Dataset

import ringpool


class Line(Dataset):
    """n noisy samples of y = 3x - 1, made on demand in the worker from the index."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        x = torch.rand(1, generator=g) * 4 - 2
        return x, 3 * x - 1 + 0.05 * torch.randn(1, generator=g)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(0)
    ctx = ringpool.get_context()  # or multiprocessing_context="ringpool": the same context
    loader = DataLoader(Line(4096), batch_size=128, shuffle=True, num_workers=args.workers,
                        multiprocessing_context=ctx, persistent_workers=True)
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for epoch in range(args.epochs):
        total = 0.0
        for x, y in loader:
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            total += loss.item() * len(x)
        print(f"epoch {epoch}: loss {total / len(loader.dataset):.4f}")
    w, b = model.weight.item(), model.bias.item()
    print(f"learned y = {w:.2f}x {b:+.2f} (true: y = 3.00x -1.00)")


if __name__ == "__main__":
    main()
