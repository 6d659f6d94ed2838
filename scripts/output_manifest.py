"""Run the commands a refactor must not change and write a manifest of every output file's sha256.

    python scripts/output_manifest.py run OUT_ROOT MANIFEST.json     # runs the jobs, hashes their files
    python scripts/output_manifest.py diff BEFORE.json AFTER.json    # lists files that differ (exit 1 if any)

The commands run as ``python -m $GEN_MODULE`` / ``python -m $EVAL_MODULE`` (defaults: the current entry
points), so an older checkout on PYTHONPATH can be measured with its own module paths.

Jobs (from the redesign issue): ``generate_backbones`` with no arguments, ``rule=and``, a sharded run
(``shard=0/2`` then ``shard=1/2`` into one folder) and ``evaluate_backbones`` of the first run (ProteinMPNN,
geometry, diversity; ESMFold is absent here). Files whose content is a wall-clock record (timings, the eval
cache, Hydra's run logs) are listed with their size only.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

GEN = [sys.executable, "-m", os.environ.get("GEN_MODULE", "superdiff_protein.cli.generate")]
EVAL = [sys.executable, "-m", os.environ.get("EVAL_MODULE", "superdiff_protein.cli.evaluate")]
JOBS = {
    "plain": GEN,
    "and": GEN + ["rule=and"],
    "shard0": GEN + ["shard=0/2", "samples_per_length=6"],
    "shard1": GEN + ["shard=1/2", "samples_per_length=6"],
}
VOLATILE = ("summary.json", ".log", "timings", "/cache/", ".lock", "eval_log")


def _run(cmd: list[str], cwd: Path) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=cwd, check=True, env=dict(os.environ, PYTHONHASHSEED="0"))


def run(root: Path, manifest: Path) -> int:
    root.mkdir(parents=True, exist_ok=True)
    for name, cmd in JOBS.items():
        out = root / ("shard" if name.startswith("shard") else name)
        _run(cmd + [f"out_dir={out}", "progress=false"], root)
    _run(EVAL + [f"samples_dir={root / 'plain'}", "esmfold=null", "progress=false",
          f"out_dir={root / 'plain_eval'}"], root)
    files = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            rel = str(p.relative_to(root))
            data = p.read_bytes()
            volatile = any(v in rel for v in VOLATILE)
            files[rel] = {"size": len(data)} if volatile else {"sha256": hashlib.sha256(data).hexdigest()}
    manifest.write_text(json.dumps(files, indent=1, sort_keys=True))
    print(f"{len(files)} files -> {manifest}")
    return 0


def diff(before: Path, after: Path) -> int:
    a, b = json.loads(before.read_text()), json.loads(after.read_text())
    bad = sorted(k for k in set(a) | set(b) if "sha256" in a.get(k, b.get(k, {})) and a.get(k) != b.get(k))
    same = sum(1 for k in a if k in b and a[k] == b[k] and "sha256" in a[k])
    for k in bad:
        print(f"differs: {k}: {a.get(k)} -> {b.get(k)}")
    print(f"{same} files byte-identical, {len(bad)} differ, {sum('size' in v for v in a.values())} volatile (size only)")
    return 1 if bad else 0


if __name__ == "__main__":
    verb, x, y = sys.argv[1:4]
    sys.exit(run(Path(x).resolve(), Path(y).resolve()) if verb == "run" else diff(Path(x), Path(y)))
