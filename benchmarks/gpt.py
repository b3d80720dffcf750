"""Case 7 of issue 6: a GPT-style model in bf16 on a GPU, accel_trainer vs a raw torch loop (tokens/s).

A decoder-only transformer (``--layers`` x ``nn.TransformerEncoderLayer`` with a causal mask,
pre-norm, GELU; width ``--width``; vocabulary 256 random tokens), AdamW + a step-interval
``LambdaLR`` warm-up, bf16 autocast, next-token cross-entropy. The raw loop is what a user
writes by hand (``torch.autocast``, ``loss.backward()``, ``opt.step()``); accel_trainer gets
``Trainer(mixed_precision="bf16")``. Loops alternate, several rounds, one process; the
table shows median tokens/s of the timed steps (after ``--warmup`` untimed steps per run,
with ``torch.cuda.synchronize()`` around the timed part).

    python benchmarks/gpt.py [--rounds 5] [--steps 200]                 # on a CUDA machine
    python benchmarks/gpt.py --device cpu --steps 6 --warmup 2 --rounds 1 --width 64 --layers 2   # smoke run
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
import warnings

import torch
from torch import nn
from torch.nn import functional as F

VOCAB, SEED = 256, 99


class GPT(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, context: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.position = nn.Parameter(torch.zeros(context, width))
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB, bias=False)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        h = self.embed(tokens) + self.position[:t]
        h = self.blocks(h, mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(h))


def loss_of(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB).float(), tokens[:, 1:].reshape(-1))


def make_model(args) -> GPT:
    torch.manual_seed(SEED)
    return GPT(args.width, args.layers, args.heads, args.context)


def make_optim(params, warmup: int = 50):
    opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.1)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))


def make_data(args) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    n = (args.steps + args.warmup) * args.batch
    return torch.utils.data.TensorDataset(torch.randint(0, VOCAB, (n, args.context + 1), generator=g))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class _Clock:
    """Starts timing after ``warmup`` steps, so start-up and compilation are not counted."""

    def __init__(self, warmup: int, device: str) -> None:
        self.warmup, self.device, self.started = warmup, device, None

    def step(self, i: int) -> None:
        if i == self.warmup:
            _sync(self.device)
            self.started = time.perf_counter()

    def stop(self) -> float:
        _sync(self.device)
        return time.perf_counter() - self.started


def run_raw(args, data) -> float:
    device = args.device
    model = make_model(args).to(device)
    opt, sched = make_optim(model.parameters())
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch, shuffle=False, pin_memory=device == "cuda")
    clock = _Clock(args.warmup, device)
    model.train()
    for i, (tokens,) in enumerate(loader):
        clock.step(i)
        tokens = tokens.to(device, non_blocking=True)
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            loss = loss_of(model, tokens)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    return clock.stop()


def run_accel_trainer(args, data, root: str) -> float:
    from accel_trainer import Callback, Trainer, TrainingModule

    class LM(TrainingModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = make_model(args)

        def training_step(self, batch, batch_idx):
            return loss_of(self.model, batch[0])

        def configure_optimizers(self):
            opt, sched = make_optim(self.parameters())
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    clock = _Clock(args.warmup, args.device)

    class Timer(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            clock.step(batch_idx)

    trainer = Trainer(max_epochs=1, cpu=args.device == "cpu", mixed_precision="bf16", enable_progress_bar=False,
                      default_root_dir=root, callbacks=[Timer()])
    trainer.fit(LM(), torch.utils.data.DataLoader(data, batch_size=args.batch, shuffle=False, pin_memory=args.device == "cuda"))
    return clock.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=200, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps per run")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    data = make_data(args)
    root_dir = tempfile.TemporaryDirectory(prefix="bench_gpt_")
    runners = {"raw torch": lambda: run_raw(args, data), "accel_trainer": lambda: run_accel_trainer(args, data, root_dir.name)}
    for run in runners.values():  # warm-up: CUDA context, cuBLAS handles, allocator
        run()
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    for r in range(args.rounds):
        for name in runners if r % 2 == 0 else list(reversed(list(runners))):
            seconds[name].append(runners[name]())
    tokens = args.steps * args.batch * args.context
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    params = sum(p.numel() for p in make_model(args).parameters())
    print(f"GPT {params / 1e6:.1f} M parameters ({args.layers} layers, width {args.width}, context {args.context}), "
          f"batch {args.batch}, bf16, {args.steps} timed steps, {args.rounds} rounds, {device}, torch {torch.__version__}")
    print(f"{'loop':<15}{'median tokens/s':>18}{'median ratio vs raw':>22}")
    for name, ts in seconds.items():
        ratios = [b / t for t, b in zip(ts, seconds["raw torch"])]  # throughput ratio
        print(f"{name:<15}{tokens / statistics.median(ts):>18.0f}{statistics.median(ratios):>21.3f}x")
    return 0 if all(math.isfinite(t) for ts in seconds.values() for t in ts) else 1


if __name__ == "__main__":
    sys.exit(main())
