"""`mirage-trl env`: the versions a bug report needs, like `trl env`, ready to paste."""

from __future__ import annotations

# The distributions mirage-trl runs on, in the order a reader checks them; absent ones print "not installed".
PACKAGES = (
    "torch",
    "transformers",
    "trl",
    "peft",
    "accelerate",
    "datasets",
    "huggingface_hub",
    "safetensors",
    "tokenizers",
    "deepspeed",
    "bitsandbytes",
    "liger_kernel",
)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "env", help="print the platform and library versions (paste them into bug reports)"
    )
    p.add_argument(
        "--json", metavar="PATH", help="also write the versions and warnings as JSON (for scripts)"
    )
    p.set_defaults(func=run)


def versions() -> dict[str, str]:
    """Platform, Python, mirage-trl, the accelerator and each of `PACKAGES` (from the installed metadata)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from .. import __version__

    out = {"Platform": platform.platform(), "Python version": platform.python_version()}
    out["mirage-trl version"] = __version__
    for name in PACKAGES:
        try:
            out[f"{name} version"] = version(name)
        except PackageNotFoundError:
            out[f"{name} version"] = "not installed"
    import torch

    if torch.cuda.is_available():
        out["Accelerator"] = ", ".join(
            torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())
        )
    else:
        out["Accelerator"] = "none (CPU)"
    return out


def run(args) -> int:
    if args.json:
        from ..folders import check_output_file

        check_output_file(args.json, "--json")  # before anything is printed
    print("\nCopy-paste the following information when you open an issue:\n")
    found = versions()
    for key, value in found.items():
        print(f"- {key}: {value}")
    print()
    from ..versions import untested

    warnings = untested({k.removesuffix(" version"): v for k, v in found.items()})
    for line in warnings:
        print(f"warning: {line}")
    if args.json:
        from ..io import write_json

        write_json(args.json, {"versions": found, "untested": warnings})
    return 0
