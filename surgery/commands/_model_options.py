"""``--dtype`` and ``--device`` for commands that load a model for compute.

``add_model_options(parser)`` adds both (``--device`` only where the command does not define it
already); ``model_options(args)`` validates them and returns ``(dtype, device)`` for
:func:`surgery.loading.load_model`. Defaults: CUDA when present, else CPU; on a GPU the
checkpoint's own dtype (``auto``: a bf16 checkpoint stays bf16), on CPU float32.
"""

from __future__ import annotations

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16")


def add_model_options(p) -> None:
    """Add ``--dtype`` and (if missing) ``--device`` to an argparse parser."""
    p.add_argument("--dtype", default=None,
                   help="compute dtype: float32, bfloat16, float16 or auto (the checkpoint's own); "
                        "default auto on a GPU, float32 on CPU")
    if "--device" not in getattr(p, "_option_string_actions", {}):
        p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")


def model_options(args) -> tuple:
    """Validated ``(dtype, device)`` from parsed ``args``.

    Returns:
        ``(dtype, device)``: dtype a ``torch.dtype`` or ``"auto"``; device a ``torch.device``.

    Raises:
        SurgeryError: an unknown dtype or device, or CUDA asked for without a GPU (one line, exit 2).
    """
    import torch

    from surgery.errors import SurgeryError
    from surgery.loading import default_device, parse_dtype

    raw = getattr(args, "device", None)
    try:
        device = torch.device(raw) if raw else default_device()
    except (RuntimeError, TypeError):
        raise SurgeryError(f"unknown --device {raw!r}", "use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise SurgeryError(f"unsupported --device {raw!r}", "use cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SurgeryError(f"--device {raw} asked for but no CUDA GPU is available", "pass --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SurgeryError(f"--device {raw}: only {torch.cuda.device_count()} GPU(s) present",
                               "pick an existing GPU index")
    name = getattr(args, "dtype", None)
    if name is None:
        return ("auto" if device.type != "cpu" else torch.float32), device
    if str(name).lower() == "auto":
        return "auto", device
    if str(name).lower() not in DTYPE_CHOICES:
        raise SurgeryError(f"unknown --dtype {name!r}", "use float32, bfloat16, float16 or auto")
    return parse_dtype(name), device
