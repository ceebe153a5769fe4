"""Keep JAX from probing for a TPU that is not there.

With libtpu installed (the `tpu` extra, which `python -m jaxclip.aot` needs), JAX
loads it at start-up on any machine; without TPU hardware libtpu then warns about the
accelerator type and the worker hostnames, JAX logs that the TPU backend failed, and
start-up takes about a second longer. Importing jaxclip settles this first: when
`JAX_PLATFORMS` is unset, libtpu is installed, and the machine has no TPU chip and no
GPU, JAX starts on the CPU alone (`JAX_PLATFORMS=cpu`, which child processes inherit).
A TPU VM, a GPU machine, or a `JAX_PLATFORMS` the user set are left alone.
"""

from __future__ import annotations

import glob
import importlib.util
import os

_GOOGLE_PCI_VENDOR = "0x1ae0"
# PCI device ids of TPU chips (v3, v4, v5p, v5e, v6e, v7x), as JAX itself knows them.
_TPU_PCI_DEVICES = {
    "0x0027",
    "0x0056",
    "0x005e",
    "0x0062",
    "0x0063",
    "0x006f",
    "0x0076",
}
_ACCELERATOR_FILES = (
    "/dev/accel*",  # TPU v4 / v5e
    "/dev/vfio/[0-9]*",  # TPU v5p / v6e
    "/dev/nvidia0",
    "/dev/nvidiactl",
    "/dev/dxg",  # GPUs under WSL2
    "/dev/kfd",  # AMD GPUs
)


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def tpu_on_pci_bus() -> bool:
    """Whether a TPU chip is attached to this machine's PCI bus."""
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        if _read(vendor) == _GOOGLE_PCI_VENDOR:
            device = os.path.join(os.path.dirname(vendor), "device")
            if _read(device) in _TPU_PCI_DEVICES:
                return True
    return False


def accelerator_attached() -> bool:
    """Whether this machine shows a TPU or GPU (PCI ids or device files)."""
    if any(glob.glob(pattern) for pattern in _ACCELERATOR_FILES):
        return True
    return tpu_on_pci_bus()


def cpu_only_without_accelerator() -> None:
    """Set `JAX_PLATFORMS=cpu` where libtpu is installed but nothing can use it."""
    if "JAX_PLATFORMS" in os.environ or "JAX_FORCE_TPU_INIT" in os.environ:
        return
    if importlib.util.find_spec("libtpu") is None or accelerator_attached():
        return
    os.environ["JAX_PLATFORMS"] = "cpu"
