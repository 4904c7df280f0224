"""Peak host memory, wall and CPU time of one ``convert_checkpoint`` in this process, with whichever
kvforge the interpreter imports - so the same command run from two checkouts compares their code:

    python benchmarks/convert_peak.py SRC gta '{}' --calib-tokens 512

prints one JSON line: ``wall_s``, ``cpu_s`` (user + system: what it costs on shared cores) and
``peak_rss_gib`` (``ru_maxrss``, the interpreter and torch included). The output goes to a temporary
directory that is removed. ``benchmarks/scale.py`` runs the same conversions in subprocesses of this
checkout only.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="model directory (safetensors)")
    parser.add_argument("transform", help="a name of TRANSFORMS (gqa, mla, gta, gla, window, chunked, ...)")
    parser.add_argument("options", help="the transform's options as JSON, e.g. '{\"n_latent_heads\": 2}'")
    parser.add_argument("--calib-tokens", type=int, default=0, help="self-calibration tokens (0: none)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    from kvforge.conversion.convert import convert_checkpoint

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="convert-peak-") as tmp:
        convert_checkpoint(
            args.src,
            Path(tmp) / "out",
            args.transform,
            json.loads(args.options),
            device=args.device,
            calibration="self" if args.calib_tokens else None,
            calib_tokens=args.calib_tokens or 16384,
        )
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result = {
        "wall_s": round(time.perf_counter() - start, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2),  # KiB on Linux
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
