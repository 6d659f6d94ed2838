"""The demo command runs end to end and reports what the picture shows."""
import json
import subprocess
import sys


def test_demo_cli(tmp_path):
    out = tmp_path / "demo.png"
    r = subprocess.run([sys.executable, "-m", "superdiff_protein.cli.demo", "--out", str(out), "--samples", "150",
                        "--steps", "80", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert out.exists() and out.stat().st_size > 10_000
    s = json.loads(out.with_suffix(".json").read_text())["rules"]
    # OR covers both models' own modes; AND concentrates where the exact densities agree
    assert s["OR (T=1, l=0)"]["fraction_left"] > 0.1 and s["OR (T=1, l=0)"]["fraction_right"] > 0.1
    assert s["AND"]["median_abs_logq_gap"] < 0.2 * s["OR (T=1, l=0)"]["median_abs_logq_gap"]
    assert not list(tmp_path.glob("*.tmp*"))


def test_demo_bad_input(tmp_path):
    r = subprocess.run([sys.executable, "-m", "superdiff_protein.cli.demo", "--out", str(tmp_path / "x.png"),
                        "--samples", "0"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "error" in r.stderr and "Traceback" not in r.stderr
