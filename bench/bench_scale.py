"""Feature extraction at GTZAN's size: 1000 generated tracks of 30 s, time and peak memory.

The tracks are written to a temporary folder and deleted afterwards. Extraction runs in a
fresh process, so its peak resident memory is that of one worker building the cache.

    python -m bench.bench_scale                            # 1000 tracks of 30 s
    python -m bench.bench_scale --tracks 200 --seconds 30  # smaller run
    python -m bench.bench_scale --quick                    # 16 tracks of 4 s
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

from bench._common import machine_facts, peak_rss_mib, run_side

SAMPLE_RATE = 22050
MAX_GENRES = 8
MEMORY_GOAL_MIB = 3 * 1024


def main() -> None:
    """Generate the tracks, extract their features in a child process, print the figures."""
    arguments = _parser().parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if arguments.quick:
        arguments.tracks, arguments.seconds = 16, 4.0
    if arguments.side == "extract":
        _extract(arguments.data, Path(arguments.output))
        return

    scratch = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    try:
        generate_seconds = _generate(scratch / "audio", arguments.tracks, arguments.seconds)
        result = run_side("bench.bench_scale",
                          ["--side", "extract", "--data", str(scratch / "audio")],
                          scratch / "extract.json")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"machine: {machine_facts()}")
    print(f"{result['n_tracks']} tracks x {arguments.seconds:g} s at {SAMPLE_RATE} Hz, "
          f"{result['n_segments']} segments, cache {result['cache_mib']:.0f} MiB "
          f"(generated in {generate_seconds:.0f} s)")
    print(f"cold extraction: {result['cold_seconds']:.1f} s, "
          f"{result['n_tracks'] / result['cold_seconds']:.1f} tracks/s")
    print(f"warm load: {result['warm_seconds']:.2f} s")
    print(f"peak RSS of the extracting worker: {result['peak_rss_mib']:.0f} MiB")
    met = result["peak_rss_mib"] < MEMORY_GOAL_MIB
    print(f"goal {'met' if met else 'NOT met'}: peak memory < {MEMORY_GOAL_MIB} MiB")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracks", type=int, default=1000,
                        help="tracks to generate (default 1000)")
    parser.add_argument("--seconds", type=float, default=30.0,
                        help="length of each track in seconds (default 30)")
    parser.add_argument("--quick", action="store_true", help="16 tracks of 4 s")
    parser.add_argument("--side", choices=("extract",), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--output", default=None, help=argparse.SUPPRESS)
    return parser


def _generate(root: Path, n_tracks: int, seconds: float) -> float:
    from features import synthesize_demo_dataset

    n_genres = min(MAX_GENRES, max(2, n_tracks // 2))
    started = time.perf_counter()
    synthesize_demo_dataset(root, n_genres=n_genres, tracks_per_genre=max(1, n_tracks // n_genres),
                            seconds=seconds, sample_rate=SAMPLE_RATE, seed=0)
    return time.perf_counter() - started


def _extract(data: Path, output: Path) -> None:
    import torch

    from features import LogMelSettings, load_features, scan_folder

    tracks = scan_folder(data)
    settings = LogMelSettings(sample_rate=SAMPLE_RATE, n_fft=1024, hop_length=512, n_mels=96,
                              segment_seconds=3.0)
    cache_dir = data.parent / "cache"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    feature_set = load_features(tracks, settings, cache_dir=cache_dir, device=device)
    cold_seconds = time.perf_counter() - started
    started = time.perf_counter()
    load_features(tracks, settings, cache_dir=cache_dir, device=device)
    warm_seconds = time.perf_counter() - started
    cache_bytes = sum(path.stat().st_size for path in cache_dir.rglob("*") if path.is_file())
    output.write_text(json.dumps({
        "n_tracks": len(feature_set.track_ids),
        "n_segments": int(feature_set.features.shape[0]),
        "cold_seconds": cold_seconds,
        "warm_seconds": warm_seconds,
        "cache_mib": cache_bytes / 2**20,
        "peak_rss_mib": peak_rss_mib(),
    }))


if __name__ == "__main__":
    main()
