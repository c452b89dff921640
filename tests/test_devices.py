"""One CPU device per core: set before JAX runs, left alone when the user chose or JAX already ran."""

import json
import os
import subprocess
import sys

PROBE = """
import json, os, jax
from jaxmem.devices import available_cores, use_one_cpu_device_per_core
first = use_one_cpu_device_per_core({count})
jax.numpy.zeros(1).block_until_ready()
late = use_one_cpu_device_per_core(3)
print(json.dumps({{"first": first, "late": late, "devices": len(jax.devices("cpu")), "cores": available_cores()}}))
"""


def _probe(count="None", xla_flags=None):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  if xla_flags:
    env["XLA_FLAGS"] = xla_flags
  out = subprocess.run([sys.executable, "-c", PROBE.format(count=count)], capture_output=True, text=True,
                       env=env, timeout=120)
  assert out.returncode == 0, out.stderr
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_one_device_per_core_by_default_and_too_late_is_a_no_op():
  got = _probe()
  assert got["first"] == got["cores"] == got["devices"]
  assert got["late"] is None  # JAX had run: the count cannot change any more


def test_explicit_count_and_users_xla_flags_win():
  assert _probe(count=3)["devices"] == 3
  got = _probe(count=3, xla_flags="--xla_force_host_platform_device_count=5")
  assert got["first"] is None and got["devices"] == 5
