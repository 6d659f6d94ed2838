"""Claims of README.md and the docs that code can check (issue 13): install instructions, output layouts."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _torch_spec() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(d for d in deps if re.match(r"torch\b", d))[len("torch"):]


def test_readme_install_names_the_supported_range_and_a_cuda_build():
    readme = (REPO / "README.md").read_text()
    spec = _torch_spec()
    assert spec == ">=2.2,<2.14"
    assert "local CPU wheel" not in readme                                # a fact of one machine, not an instruction
    assert f"`{spec}`" in readme
    # a CUDA build of a torch in the supported range, from the PyTorch index, then the package
    assert re.search(rf'pip install "torch{re.escape(spec)}" --index-url https://download\.pytorch\.org/whl/cu\d+ '
                     r"&& pip install -e \.", readme)
    assert re.search(rf'pip install "torch{re.escape(spec)}" --index-url https://download\.pytorch\.org/whl/cpu',
                     readme)
    # the quick-start pin is still a version in that range
    from packaging.specifiers import SpecifierSet

    pins = set(re.findall(r"torch==([\d.]+)", readme))
    assert pins and all(p in SpecifierSet(spec) for p in pins)


def test_default_layout_is_not_called_framediffs():
    """The default (flat) layout is ours; FrameDiff's is layout=framediff."""
    for f in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "superdiff_protein" / "cli" / "generate.py"]:
        text = f.read_text()
        assert "(FrameDiff layout)" not in text and "FrameDiff's layout, so tools" not in text, f
    tut = (REPO / "docs" / "tutorial.md").read_text()
    assert "layout=framediff" in tut and "length_80/sample_0/sample_1.pdb" in tut


def test_unverified_paper_figures_are_marked_so():
    """The paper's "209 s / 1,082 s per SD image" and its table number could not be checked against the paper text
    (issue 13): any paragraph of README or docs that names them says it is not verified."""
    pat = re.compile(r"\b209 s\b|1,082|\b1082\b|Table 3")
    for f in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for para in re.split(r"\n\s*\n", f.read_text()):
            if pat.search(para):
                assert "not verified" in para, (f.name, para[:200])


def test_benchmark_tables_are_rendered_from_the_committed_json():
    """The re-measured GPU sections of docs/benchmarks.md are render_tables.py's output, row for row."""
    import subprocess
    import sys

    res = REPO / "bench" / "results"
    files = [res / n for n in ("multigpu_h200x2_2026-11-30_a.json", "multigpu_h200x2_2026-11-30_b.json",
                               "multigpu_h200x2_2026-11-30_c.json", "esmfold_h200.json", "sd_and_h200.json",
                               "compile_h200_2026-11-30.json", "fkc_overhead_h200_2026-11-30d.json")]
    out = subprocess.run([sys.executable, str(REPO / "bench" / "render_tables.py"), *map(str, files)],
                         capture_output=True, text=True, check=True).stdout
    for group in (["compile_matrix_h200x2_2026-11-30a.json", "compile_matrix_h200x2_2026-11-30b.json"],
                  ["multigpu_h200x2_2026-11-30_d.json"], ["esmfold_precision_h200x2_2026-11-30.json"],
                  ["compile_rows_h200x2_2026-11-30c.json", "compile_rows_h200x2_2026-11-30d.json"],
                  ["multigpu_h200x2_2026-11-30_e.json", "multigpu_h200x2_2026-11-30_f.json"],
                  ["esmfold_unchunked_h200x2_2026-11-30.json", "esmfold_compile_chunk128_h200x2_2026-11-30.json"],
                  ["compile_rows_h200x2_2026-11-30g.json"], ["compile_rows_h200x2_2026-11-30h.json"],
                  ["multigpu_h200x2_2026-11-30_g.json"]):
        out += subprocess.run([sys.executable, str(REPO / "bench" / "render_tables.py"), *(str(res / n) for n in group)],
                              capture_output=True, text=True, check=True).stdout   # tables of their own
    page = (REPO / "docs" / "benchmarks.md").read_text()
    rows = [line for line in out.splitlines() if line.startswith("|") or line.startswith("Median ratios")]
    assert len(rows) > 20
    for line in rows:
        assert line in page, line
