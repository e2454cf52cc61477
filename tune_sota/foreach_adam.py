"""fastai's Adam (true weight decay, as `fastai.optimizer.Adam` with its defaults) with each step done by
torch's `_foreach` kernels over all of a parameter group's tensors at once, instead of fastai's Python
loop of five callbacks per tensor (about 1,000 small kernel launches per step for xresnet50).

It is a fastai `Optimizer` with the same per-tensor state (`grad_avg`, `sqr_avg`, `step`, and the
`do_wd` that `Learner(wd_bn_bias=False)` sets to keep BatchNorm and biases undecayed), so the one-cycle
schedule drives it, `recipe.save_state` saves it and `recipe.load_state` loads the same checkpoints
as fastai's Adam, in either direction. Not used by default: on one CPU thread it is 0.7-0.9x as fast as
fastai's loop (bench/opt_step.py, bench/RESULTS.md); it is for GPUs, where every one of fastai's small
per-tensor ops is a kernel launch, once measured there.
"""

from __future__ import annotations

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


def foreach_adam(params, lr, **kwargs) -> ForeachAdam:
    """An `opt_func` for fastai's `Learner`, in place of `fastai.optimizer.Adam`."""
    return ForeachAdam(params, lr, **kwargs)
