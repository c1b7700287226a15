"""benchmarks/device.py at its tiny size on CPU: a smoke test of the script, not a measurement."""

import math
import re

from benchmarks import device

ROWS = ("prefill", "decode", "decode memory bandwidth", "update (policy + critic)", "update MFU",
        "RL iteration, lookup_qa", "RL iteration, env steps")


def test_device_benchmark_tiny(tmp_path):
  out = tmp_path / "device.md"
  result = device.main(["--size", "tiny", "--repeats", "1", "--markdown", str(out)])
  table = out.read_text()
  assert "jax " in table and "`cpu`" in table  # the header names the jax version and the device kind
  rows = {line.split("|")[1].strip(): line for line in table.splitlines()
          if line.startswith("| ") and "---" not in line}
  for name in ROWS:
    assert name in rows, (name, table)
    cells = rows[name].split("|")[3:5]  # median s, throughput
    numbers = [float(x) for cell in cells for x in re.findall(r"\d+(?:\.\d+)?(?:e[+-]?\d+)?", cell)]
    assert numbers, rows[name]
    assert all(math.isfinite(x) and x > 0 for x in numbers), rows[name]
  assert rows["update MFU"].split("|")[5].strip() == "n/a"  # no peak FLOP/s is known for a CPU
  figures = [*result["sampler"].values(), *result["update"].values(), *result["iteration"].values()]
  assert all(math.isfinite(x) and x > 0 for x in figures), figures


def test_device_peaks_table():
  assert device.device_peaks("NVIDIA H200")[0] == "H200"
  assert device.device_peaks("NVIDIA H100 80GB HBM3")[0] == "H100 SXM"
  assert device.device_peaks("NVIDIA H100 PCIe")[0] is None
  assert device.device_peaks("NVIDIA A100-SXM4-40GB")[0] == "A100 40GB"
  assert device.device_peaks("NVIDIA A100-SXM4-80GB")[0] == "A100 80GB"
  assert device.device_peaks("TPU v5 lite")[0] == "TPU v5e"
  assert device.device_peaks("TPU v5p")[0] == "TPU v5p"
  assert device.device_peaks("TPU v6 lite")[0] == "TPU v6e"
  assert device.device_peaks("TPU v4")[0] == "TPU v4"
  assert device.device_peaks("cpu") == (None, None, None)
