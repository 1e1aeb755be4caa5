"""What the benchmarks print about the machine, and waiting for it to be idle.

Ratios between frameworks differ by CPU (vector width, native bf16, AMX), so
every benchmark table names the processor and its ISA extensions.
"""

from __future__ import annotations

import os
import platform
import time

# The extensions that change which kernels the frameworks pick.
ISA_FLAGS = ('avx2', 'avx512f', 'avx512_bf16', 'avx512_vnni', 'amx_tile',
             'amx_bf16')


def _cpuinfo_field(name: str) -> str | None:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith(name):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return None


def cpu_model() -> str:
  """The processor's model name (lscpu's 'Model name')."""
  return (_cpuinfo_field('model name') or platform.processor()
          or platform.machine())


def isa_flags() -> list[str]:
  """Which of ``ISA_FLAGS`` /proc/cpuinfo lists (empty off Linux)."""
  have = set((_cpuinfo_field('flags') or '').split())
  return [flag for flag in ISA_FLAGS if flag in have]


def describe() -> str:
  """One line: CPU model, logical CPUs and ISA flags (or their absence)."""
  flags = isa_flags()
  absent = [f for f in ('avx512f', 'amx_tile') if f not in flags]
  isa = ', '.join(flags) or 'none of ' + ', '.join(ISA_FLAGS)
  if absent:
    isa += f' (no {", no ".join(absent)})'
  return f'{cpu_model()}, {os.cpu_count()} logical CPUs; ISA: {isa}'


def load_average() -> float:
  """The 1-minute load average (0 where the OS does not say)."""
  try:
    return os.getloadavg()[0]
  except OSError:
    return 0.0


def wait_for_quiet_machine(max_load: float, retries: int, wait_s: float
                           ) -> list[float]:
  """Waits while other work loads the CPUs; returns the loads seen."""
  seen = [load_average()]
  for _ in range(retries):
    if seen[-1] <= max_load:
      break
    print(f'# load {seen[-1]:.2f} > {max_load:.2f}: waiting {wait_s:.0f} s',
          flush=True)
    time.sleep(wait_s)
    seen.append(load_average())
  return seen
