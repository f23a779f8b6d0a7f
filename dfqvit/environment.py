"""Where a measurement was taken: device name and library versions, recorded in every benchmark JSON."""
from __future__ import annotations

import platform

import torch


def describe_environment(device: torch.device) -> dict:
    import timm

    import dfqvit

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu ({platform.processor() or platform.machine()})"
    return {"device": name, "device_type": device.type, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "timm": timm.__version__, "triton": triton_version,
            "dfqvit": dfqvit.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "cuda": torch.version.cuda}
