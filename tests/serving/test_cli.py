"""``kiln serve`` and ``kiln bench serve`` are on the command line, and Kiln's core does not
import Ray (an optional extra)."""
import subprocess
import sys


def test_core_does_not_import_ray():
    code = ("import sys, kiln, kiln.cli, kiln.artifact, kiln.batching; kiln.load; "
            "assert 'ray' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ray'))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]


def test_serve_commands_parse():
    p = subprocess.run([sys.executable, "-m", "kiln.cli", "serve", "--help"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    for flag in ("--replicas", "--max-batch-size", "--batch-wait-ms", "--threads", "--port", "--address"):
        assert flag in p.stdout
    p = subprocess.run([sys.executable, "-m", "kiln.cli", "bench", "serve", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and "--offline" in p.stdout, p.stderr
