"""opt_step: the optimizer step's share of a training step on this machine's CPU, fastai's Adam (a Python
loop of five callbacks per parameter tensor) against `ForeachAdam` below (the same arithmetic, the same
state, done by torch's `_foreach` kernels), for the proxy model and xresnet50. ForeachAdam was measured
slower on the CPU and not adopted: it left the package (issue 28) and lives here, beside its measurement;
a 2-epoch fit with it gave weights bit-identical to fastai's Adam (the test that showed it went with it).

    python bench/opt_step.py      # proxy (xresnet18 width 0.25, 32 px, batch 64), xresnet50 (64 px, batch 8)

Random images, 10 classes, no data loading: forward + backward and the optimizer step are timed apart
(`time.perf_counter` around each), the two optimizers in alternating rounds on one model copy each, so a
machine loaded by other work slows both alike; medians over the rounds. BatchNorm and biases get no
weight decay, as `Learner(wd_bn_bias=False)` sets it.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

from common import record, table


def _foreach_adam():
    """`ForeachAdam`: fastai's Adam (true weight decay, its `mom`/`sqr_mom`/`eps`, per-tensor `do_wd`) stepped
    with `torch._foreach_*` ops over all of a parameter group's tensors at once."""
    from collections import defaultdict

    import torch
    from fastai.optimizer import Optimizer

    class ForeachAdam(Optimizer):
        """`fastai.optimizer.Adam(decouple_wd=True)`, stepped with `torch._foreach_*` ops."""

        def __init__(self, params, lr, mom: float = 0.9, sqr_mom: float = 0.99, eps: float = 1e-5, wd: float = 0.01):
            super().__init__(params, [], lr=lr, mom=mom, sqr_mom=sqr_mom, eps=eps, wd=wd)

        @torch.no_grad()
        def step(self, closure=None):
            if closure is not None:
                raise NotImplementedError("fastai optimizers don't support closures")
            groups = defaultdict(list)  # tensors that share hyper-parameters, decay and step count step together
            for p, _, state, hyper in self.all_params(with_grad=True):
                if "grad_avg" not in state:
                    state.update(grad_avg=torch.zeros_like(p), sqr_avg=torch.zeros_like(p), step=0)
                state["step"] += 1
                groups[(id(hyper), state.get("do_wd", True), state["step"])].append((p, state, hyper))
            for (_, do_wd, step), items in groups.items():
                h = items[0][2]
                lr, mom, sqr_mom, eps, wd = h["lr"], h["mom"], h["sqr_mom"], h["eps"], h["wd"]
                ps = [p for p, _, _ in items]
                grads = [p.grad for p in ps]
                grad_avgs = [s["grad_avg"] for _, s, _ in items]
                sqr_avgs = [s["sqr_avg"] for _, s, _ in items]
                if do_wd and wd != 0:  # fastai's weight_decay: before the update, on the weights themselves
                    torch._foreach_mul_(ps, 1 - lr * wd)
                torch._foreach_mul_(grad_avgs, mom)  # fastai's average_grad(dampening=True)
                torch._foreach_add_(grad_avgs, grads, alpha=1 - mom)
                torch._foreach_mul_(sqr_avgs, sqr_mom)  # average_sqr_grad
                torch._foreach_addcmul_(sqr_avgs, grads, grads, value=1 - sqr_mom)
                debias1, debias2 = 1 - mom**step, 1 - sqr_mom**step  # adam_step
                denom = torch._foreach_div(sqr_avgs, debias2)
                torch._foreach_sqrt_(denom)
                torch._foreach_add_(denom, eps)
                torch._foreach_addcdiv_(ps, grad_avgs, denom, value=-lr / debias1)

    return ForeachAdam


MODELS = {  # name: (arch, width, size, batch)
    "proxy": ("xresnet18", 0.25, 32, 64),
    "xresnet50": ("xresnet50", 1.0, 64, 8),
}


def build(arch: str, width: float):
    """The model `recipe.build_learner` builds for 10 classes."""
    from fastai.vision.models import xresnet

    stem = (max(8, int(32 * width)), max(8, int(32 * width)), 64)
    return getattr(xresnet, arch)(n_out=10, widen=width, stem_szs=stem)


def optimizer(kind: str, model):
    from fastai.optimizer import Adam
    from fastai.torch_core import norm_bias_params, trainable_params

    opt = (Adam if kind == "fastai Adam" else _foreach_adam())(trainable_params(model), lr=1e-3, wd=0.01)
    for p in norm_bias_params(model, True):
        opt.state[p]["do_wd"] = False
    return opt


def measure(name: str, rounds: int, steps: int) -> list:
    """[name, tensors, fwd+bwd ms, fastai step ms, share, foreach step ms, share, step x, train step x]."""
    import torch

    arch, width, size, bs = MODELS[name]
    torch.manual_seed(0)
    base = build(arch, width)
    runs = {k: (m := copy.deepcopy(base), optimizer(k, m)) for k in ("fastai Adam", "foreach Adam")}
    x, y = torch.randn(bs, 3, size, size), torch.randint(0, 10, (bs,))
    loss_func = torch.nn.CrossEntropyLoss()
    times = {k: ([], []) for k in runs}

    def one(model, opt):
        t0 = time.perf_counter()
        loss_func(model(x), y).backward()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        opt.zero_grad()
        return t1 - t0, t2 - t1

    for model, opt in runs.values():  # warm-up: allocator, optimizer state
        for _ in range(2):
            one(model, opt)
    for _ in range(rounds):
        for k, (model, opt) in runs.items():
            f, s = zip(*(one(model, opt) for _ in range(steps)))
            times[k][0].append(statistics.mean(f))
            times[k][1].append(statistics.mean(s))
    fb = 1000 * statistics.median(times["fastai Adam"][0] + times["foreach Adam"][0])
    slow, fast = (1000 * statistics.median(times[k][1]) for k in runs)
    n = sum(1 for p in base.parameters() if p.requires_grad)
    return [f"{name} ({arch} w{width:g}, {size} px, batch {bs})", n, fb, slow, f"{slow / (fb + slow):.0%}", fast,
            f"{fast / (fb + fast):.0%}", f"{slow / fast:.1f}x", f"{(fb + slow) / (fb + fast):.2f}x"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=4, help="training steps per optimizer per round")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--no-record", action="store_true", help="print only; do not append to bench/RESULTS.md")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in MODELS:
        rows.append(measure(name, args.rounds, args.steps))
        print(rows[-1], flush=True)
    out = table(["model", "param tensors", "fwd+bwd ms", "fastai Adam step ms", "share of train step",
                 "foreach step ms", "share", "step speed-up", "train step speed-up"], rows)
    out += (f"\n\n- {torch.get_num_threads()} torch threads; medians of {args.rounds} alternating rounds of "
            f"{args.steps} steps; random data, no data loading; the two optimizers give identical weights")
    print(out)
    if not args.no_record:
        record("opt_step: the optimizer step's share of a training step (CPU)", out)


if __name__ == "__main__":
    main()
