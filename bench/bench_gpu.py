"""GPU check in one script: training throughput against the GPU's peak, utilization, peer ratio.

No GPU was available when this was written, so it has not yet run on one. On a CUDA
machine, from the repository root with the venv active:

    GENRE_SEARCH_BENCH_DATA=/path/to/gtzan-mini python -m bench.bench_gpu

For the largest CNN of the search space it prints the samples/s and achieved TFLOP/s of
the training step in float32, in bfloat16 autocast with channels-last, and with
torch.compile unless --no-compile. TFLOP/s are also given as a share of the GPU's dense
bfloat16 peak. Then it runs bench_peer's comparison with ``--device cuda`` and prints the
GPU utilization that nvidia-smi sampled meanwhile. Without CUDA it prints a notice and
exits with 0 under ``--quick`` (the smoke test) and 2 otherwise.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from torch import nn

from bench._common import REPO_ROOT, bench_data_root, machine_facts

# Dense bfloat16 tensor-core peaks in TFLOP/s as vendors quote them for these parts.
# NOTE: These are estimates not checked against each data sheet; PCIe parts and other
# clocks have lower peaks, so a share computed from them is a lower bound there.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
                    "A10": 125.0, "RTX 4090": 165.0}
BATCH_SIZE = 32
INPUT_SHAPE = (1, 96, 130)  # (channel, mel, frames) of a 3 s segment at 22050 Hz, hop 512
N_CLASSES = 10


def main() -> None:
    """Run the three checks and print their figures."""
    arguments = _parser().parse_args()
    if not torch.cuda.is_available():
        print("No CUDA GPU found: bench_gpu needs one. Run it on a GPU machine "
              "(see docs/benchmarks.md).")
        sys.exit(0 if arguments.quick else 2)
    print(f"machine: {machine_facts()}")
    name = torch.cuda.get_device_name(0)
    peak = next((value for key, value in PEAK_BF16_TFLOPS.items() if key in name), None)
    steps = 20 if arguments.quick else 200
    for label, mixed, compiled in _variants(arguments.no_compile):
        samples_per_second, tflops = _throughput(mixed=mixed, compiled=compiled, steps=steps)
        share = f"{100 * tflops / peak:.1f} % of {peak:g}" if peak else "peak unknown"
        print(f"{label:<32} {samples_per_second:10.0f} samples/s  {tflops:7.2f} TFLOP/s ({share})")
    if arguments.quick:
        return
    data = arguments.data or bench_data_root()
    _study_utilization(data, trials=arguments.trials, epochs=arguments.epochs)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="audio folder")
    parser.add_argument("--trials", type=int, default=6, help="trials per side (default 6)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs per trial (default 10)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile run")
    parser.add_argument("--quick", action="store_true", help="throughput only, 20 steps")
    return parser


def _variants(no_compile: bool) -> list[tuple[str, bool, bool]]:
    variants = [("float32", False, False), ("bfloat16 + channels-last", True, False)]
    if not no_compile:
        variants.append(("bfloat16 + channels-last + compile", True, True))
    return variants


def _throughput(*, mixed: bool, compiled: bool, steps: int) -> tuple[float, float]:
    """Return samples/s and TFLOP/s of training steps on random input, after warm-up."""
    from models import build_model

    device = torch.device("cuda")
    model = build_model("cnn", n_classes=N_CLASSES, n_mels=INPUT_SHAPE[1],
                        params={"n_conv_layers": 4, "base_channels": 32, "kernel_size": 5})
    model = model.to(device)
    inputs = torch.randn(BATCH_SIZE, *INPUT_SHAPE, device=device)
    targets = torch.randint(0, N_CLASSES, (BATCH_SIZE,), device=device)
    if mixed:
        model = model.to(memory_format=torch.channels_last)
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    runnable: nn.Module = torch.compile(model) if compiled else model  # type: ignore[assignment]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    flops = _step_flops(model, inputs, targets)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=mixed):
            loss = nn.functional.cross_entropy(runnable(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(10):
        step()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return steps * BATCH_SIZE / seconds, steps * flops / seconds / 1e12


def _step_flops(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        nn.functional.cross_entropy(model(inputs), targets).backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def _study_utilization(data: Path, *, trials: int, epochs: int) -> None:
    """Run bench_peer on CUDA while nvidia-smi samples the GPU utilization."""
    samples: list[float] = []
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_utilization, args=(samples, stop), daemon=True)
    sampler.start()
    command = [sys.executable, "-m", "bench.bench_peer", "--device", "cuda", "--data", str(data),
               "--trials", str(trials), "--epochs", str(epochs)]
    try:
        subprocess.run(command, check=True, cwd=REPO_ROOT)
    finally:
        stop.set()
        sampler.join()
    if samples:
        print(f"GPU utilization during both sides (nvidia-smi, {len(samples)} samples): "
              f"mean {statistics.fmean(samples):.0f} %, max {max(samples):.0f} %")


def _sample_utilization(samples: list[float], stop: threading.Event) -> None:
    query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
             "-i", "0"]
    while not stop.is_set():
        try:
            output = subprocess.run(query, capture_output=True, text=True, check=True).stdout
            samples.append(float(output.strip().splitlines()[0]))
        except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
            return
        stop.wait(0.5)


if __name__ == "__main__":
    main()
