"""Precision and memory format as a function of the device, so that the bf16 + channels_last branch a
GPU takes also runs (and is tested) on a CPU.

`precision: auto` is bf16 where the GPU computes it natively (Ampere and later), fp16 with a gradient
scaler on older GPUs (V100, T4: their bf16 is emulated, without tensor cores), and fp32 on a CPU.
fastai's `MixedPrecision` hard-codes CUDA autocast; `DeviceMixedPrecision` is the same callback with
the device's autocast, so that a CPU test shows the convolutions really ran in bf16.
"""

from __future__ import annotations

import logging

import torch
from fastai.callback.channelslast import ChannelsLast  # noqa: F401  (patches Learner.to_channelslast)
from fastai.callback.fp16 import MixedPrecision
from fastcore.foundation import L
from torch.amp import GradScaler, autocast

log = logging.getLogger(__name__)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def native_bf16(device: torch.device | None = None) -> bool:
    """Whether the CUDA `device` computes bf16 natively, not by emulation (which is slower than fp16)."""
    if not torch.cuda.is_available():
        return False
    try:  # torch >= 2.4: the default (True) also counts GPUs that only emulate bf16
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:
        return torch.cuda.get_device_capability(device) >= (8, 0)


def precision_for(device: torch.device, precision: str = "auto") -> str:
    """The precision (`fp32`, `bf16`, `fp16`) a config's `precision` means on `device`."""
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"  # CPU autocast to bf16 is slower than fp32 on most CPUs without AMX
    return "bf16" if native_bf16(device) else "fp16"


class DeviceMixedPrecision(MixedPrecision):
    """fastai's `MixedPrecision` with autocast (and, for fp16, a gradient scaler) on `device_type`."""

    def __init__(self, amp_mode: str = "bf16", device_type: str = "cuda", **kwargs):
        super().__init__(amp_mode, **kwargs)
        self.device_type = device_type

    def before_fit(self):
        dtype = DTYPES[self.amp_mode.value]
        # bf16 has fp32's range, so only fp16 needs its loss scaled (and then checked: one sync per step)
        self.kwargs["enabled"] = dtype == torch.float16
        self.autocast = autocast(self.device_type, dtype=dtype)
        self.learn.scaler, self.scales = GradScaler(self.device_type, **self.kwargs), L()


def apply(learn, precision: str, device: torch.device) -> None:
    """Give `learn` the mixed-precision callback of `precision` and, on CUDA or in mixed precision,
    channels_last weights and inputs (NHWC convolutions: tensor cores on a GPU, oneDNN's bf16 on a CPU)."""
    if precision in DTYPES:
        learn.add_cb(DeviceMixedPrecision(precision, device.type))
    if device.type == "cuda" or precision in DTYPES:
        # After the precision: fastai's `to_channelslast` would add a second MixedPrecision (fp16) otherwise.
        learn.to_channelslast(use_amp=False)


def setup_device(device: torch.device) -> None:
    """Process-wide settings for training on `device`: cuDNN picks its fastest convolution per shape
    (a run has only a few shapes: one per progressive-resizing stage, plus validation's)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
