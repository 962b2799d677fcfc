"""Mixed-precision helpers shared by the model parts: heads and the renderer always run in fp32."""
from __future__ import annotations

import torch


def fp32_autocast_off(device_type: str):
    """Context manager: autocast disabled, so what runs inside stays in fp32."""
    return torch.autocast(device_type=device_type, enabled=False)
