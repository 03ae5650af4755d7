"""`ccp-params [--json PATH] [--tiny] [--methods NAME ...]`: trainable parameters per method.

Builds the SD v1.5 UNet and text encoder architectures with random weights (no download; the
counts depend only on the architecture), builds each method on them and prints its trainable
parameter count next to the paper's Table 1 ``#param`` column (`ccp.methods.params`). ``--tiny``
uses the tiny test prior instead (seconds; for smoke tests).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

from ccp.methods.params import count, format_table
from ccp.priors.tiny import build_sd15_shaped_prior, build_tiny_prior


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ccp-params", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="also write the counts as JSON to this path")
    parser.add_argument("--tiny", action="store_true", help="count on the tiny test prior instead of SD v1.5's shapes")
    parser.add_argument("--methods", nargs="+", metavar="NAME", help="only these methods (registry names)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    if not args.tiny:
        print("building SD v1.5-shaped UNet and text encoder (random weights)...", flush=True)
    prior, arch = (build_tiny_prior(0), "tiny") if args.tiny else (build_sd15_shaped_prior(0), "sd15")
    rows = count(prior, args.methods)
    facts = {"unet_parameters": sum(p.numel() for p in prior.unet.parameters()),
             "text_encoder_hidden_size": prior.text_encoder.config.hidden_size}
    print(f"trainable parameters on the {'SD v1.5' if arch == 'sd15' else 'tiny'} architecture "
          f"(UNet {facts['unet_parameters']:,} parameters):")
    print(format_table(rows))
    print(f"({time.perf_counter() - start:.0f} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"architecture": arch, **facts, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
