"""Checkpoint conversion without the `ldmscale` entry point (same arguments as `ldmscale convert`).

    python tools/convert_checkpoint.py zero-to-safetensors runs/sd2 sd2.safetensors --ema
    python tools/convert_checkpoint.py to-original runs/sd2 sd2-original.safetensors
    python tools/convert_checkpoint.py from-original v2-1_512-ema-pruned.safetensors imported/ \
        --config configs/ldm/sd2-base.yaml --scale-factor 0.18215
    python tools/convert_checkpoint.py to-diffusers runs/sd2 sd2-diffusers/
    python tools/convert_checkpoint.py from-diffusers sd2-diffusers/ imported/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ldmscale.convert.commands import add_convert_arguments, run_action  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_convert_arguments(parser)
    args = parser.parse_args(argv)
    try:
        print(f"wrote {run_action(args)}")
    except ValueError as e:
        print(f"convert_checkpoint: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
