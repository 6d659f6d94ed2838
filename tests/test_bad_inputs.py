"""Every bad input, every command: one clear line on stderr, exit code 2, nothing written (issue 12, part 5).

One table (``CASES``) drives the test. Each row runs a command's ``main`` in-process (or, for the rows marked
``sub``, the real console entry in a subprocess, so that warnings and log lines a user would see are checked
too) and asserts:

* exit code 2;
* stderr is exactly one non-empty line, ``<command>: error: ...``, holding the row's expected words, with no
  traceback; stdout is empty;
* nothing was written: the output path does not exist afterwards, and the input and working directories are
  byte-for-byte unchanged (every file's size and mtime);
* no code from a hostile checkpoint ran (its marker file never appears).

The exit-code contract itself lives in ``superdiff_protein/cli/common.py`` and ``docs/tutorial.md`` (§8).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TEST_DATA

REPO = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()


# ------------------------------------------------------------------------------------------ inputs
class _Touch:
    """Pickles as a call to ``Path.touch(marker)``: loading it through an unsafe loader creates the marker."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Read-only inputs shared by all rows (a snapshot checks that no row writes here)."""
    d = tmp_path_factory.mktemp("inputs")
    (d / "afile").write_text("not a directory\n")
    (d / "adir").mkdir()
    (d / "empty_dir").mkdir()
    (d / "empty.pt").write_bytes(b"")
    torch.save({"global_step": 1, "payload": _Touch(d / "PAYLOAD_RAN")}, d / "hostile.pt")
    torch.save({"weights": torch.zeros(64, 64)}, d / "good.pt")
    (d / "truncated.pt").write_bytes((d / "good.pt").read_bytes()[:300])
    # two real chains as a samples directory, three as a prepare_dataset input
    chains = sorted((TEST_DATA / "pdownb").glob("*.pdb"))[:3]
    (d / "samples").mkdir()
    (d / "pdbs").mkdir()
    for i, p in enumerate(chains):
        shutil.copy(p, d / "pdbs" / p.name)
        if i < 2:
            shutil.copy(p, d / "samples" / p.name)
    # a one-residue structure (the first residue's atoms of a real chain)
    lines = [ln for ln in chains[0].read_text().splitlines() if ln.startswith("ATOM")]
    first = lines[0][22:26]
    (d / "one_residue").mkdir()
    (d / "one_residue" / "x.pdb").write_text("\n".join([ln for ln in lines if ln[22:26] == first] + ["END", ""]))
    from superdiff_protein.frames.data import prepare_dataset

    prepare_dataset(d / "pdbs", d / "ds.pt", min_length=10, max_length=2000, split=None, progress=False)
    return d


def _resume_dir(kind: str):
    """Setup: ``{tmp}/run/last.ckpt`` is a truncated / hostile / empty checkpoint, resumed with resume=true."""
    def setup(tmp: Path, inp: Path) -> None:
        (tmp / "run").mkdir()
        src = {"truncated": "truncated.pt", "hostile": "hostile.pt", "empty": "empty.pt"}[kind]
        shutil.copy(inp / src, tmp / "run" / "last.ckpt")
    return setup


def _existing_run(tmp: Path, inp: Path) -> None:
    (tmp / "run").mkdir()
    shutil.copy(inp / "good.pt", tmp / "run" / "last.ckpt")


# ------------------------------------------------------------------------------------------ commands
def _generate(argv):
    from superdiff_protein.cli.generate import main
    return main(argv)


def _evaluate(argv):
    from superdiff_protein.cli.evaluate import main
    return main(argv)


def _prepare(argv):
    from superdiff_protein.cli.prepare_dataset import main
    return main(argv)


def _train(argv):
    from superdiff_protein.cli.train import main
    return main(argv)


def _gen_images(argv):
    from superdiff_protein.cli.images import generate_main
    return generate_main(argv)


def _train_images(argv):
    from superdiff_protein.cli.images import train_main
    return train_main(argv)


# prog: (in-process main, subprocess command, base arguments)
COMMANDS = {
    "generate_backbones": (_generate, ["-m", "superdiff_protein.cli.generate"],
                           ["models=[exact-helix]", "lengths=[20]", "samples_per_length=1", "num_steps=2",
                            "plots=false", "progress=false", "out_dir={out}"]),
    "evaluate_backbones": (_evaluate, ["-m", "superdiff_protein.cli.evaluate"],
                           ["samples_dir={in}/samples", "out_dir={out}", "esmfold=null", "progress=false",
                            "workers=1"]),
    "prepare_dataset": (_prepare, ["-m", "superdiff_protein.cli.prepare_dataset"],
                        ["input_dir={in}/pdbs", "output={out}/ds.pt", "progress=false"]),
    "train_frame_model": (_train, ["-m", "superdiff_protein.cli.train"],
                          ["model=tiny", "data.path={in}/ds.pt", "data.batch_size=2", "max_steps=1",
                           "trainer.tensorboard=false", "out_dir={out}"]),
    "generate_images": (_gen_images, ["-m", "superdiff_protein.cli.images"],
                        ["model_path={in}/adir", "out_dir={out}", "num_inference_steps=2", "batch_size=1"]),
    "train_image_model": (_train_images, ["-c", "from superdiff_protein.cli.images import train_main; train_main()"],
                          ["archive={in}/afile", "output={out}", "max_steps=1", "batch_size=2"]),
}

G, E, P, T, GI, TI = ("generate_backbones", "evaluate_backbones", "prepare_dataset", "train_frame_model",
                      "generate_images", "train_image_model")
# (command, arguments after the base ones, words expected in the error line, options)
#   options: base=False drops the base arguments; sub=True runs the console entry in a subprocess;
#            setup=f(tmp, inputs) prepares files under the test's own directory; cuda_absent=True skips with CUDA
CASES = [
    # ---- generate_backbones
    (G, ["foo=1"], ["unknown option 'foo'", "valid options"], {"sub": True}),
    (G, ["model=small"], ["unknown option 'model'", "did you mean 'models'"], {}),
    (G, ["modles=[exact-strand]"], ["did you mean 'models'"], {}),
    (G, ["exact.foo=1"], ["unknown option 'exact.foo'", "trans_std"], {}),
    # ---- FKC rules (issue 15): beta <= 0, group size, rule/model mismatches
    (G, ["rule=anneal", "beta=0"], ["beta must be > 0"], {}),
    (G, ["init_logq=model", "models=[default-helix]"], ["init_logq=model needs", "use init_logq=prior"], {}),
    (G, ["rule=anneal", "beta=-1"], ["beta must be > 0"], {}),
    (G, ["rule=product", "smc.group_size=3", "samples_per_length=10"],
     ["does not divide samples_per_length=10", "samples_per_length=12"], {}),
    (G, ["rule=product", "smc.group_size=2", "samples_per_length=4", "batch_size=5"],
     ["multiple of smc.group_size=2", "batch_size=4"], {}),
    (G, ["rule=or", "smc.group_size=2"], ["needs a rule with importance weights"], {}),
    (G, ["rule=geometric", "models=[exact-helix]"], ["geometric needs exactly 2 models"], {}),
    (G, ["rule=product", "smc.resample=foo"], ["smc.resample: must be one of"], {}),
    (G, ["rule=product", "smc.foo=1"], ["unknown option 'smc.foo'", "group_size"], {}),
    (G, ["rule=product", "smc.t_min=0.5", "smc.t_max=0.2"], ["t_min (0.5) must not exceed t_max (0.2)"], {}),
    (G, ["generate=nope"], ["no such generate config", "paper_or"], {}),
    (G, ["--nope"], ["unrecognized arguments: --nope"], {}),
    (G, ["models=[]"], ["models: the list is empty", "default-helix"], {}),
    (G, ["models=[py:os:getcwd]"], ["returned a str, not a ScoreModel"], {}),
    (G, ["models=[no-such-model]"], ["unknown model 'no-such-model'"], {}),
    (G, ["models=[{in}/adir]"], ["is a directory"], {}),
    (G, ["models=[{in}/empty.pt]"], ["empty"], {}),
    (G, ["models=[{in}/truncated.pt]"], ["truncated"], {}),
    (G, ["models=[{in}/hostile.pt]"], ["refused", "allow-list"], {}),
    (G, ["lengths=[0]"], [">= 1"], {}),
    (G, ["lengths=abc"], ["lengths: cannot parse 'abc'"], {}),
    (G, ["lengths=[1"], ["cannot parse 'lengths=[1'"], {}),
    (G, ["lengths=[400]"], ["supports lengths up to"], {}),
    (G, ["temperature=0"], ["T must be > 0"], {}),
    (G, ["temperature=nan"], ["temperature: must be finite"], {}),
    (G, ["num_steps=0"], ["num_steps: must lie in"], {}),
    (G, ["rule=xor"], ["rule: must be one of"], {}),
    (G, ["bias=[0,1,2]"], ["bias: 3 value(s) given for 1 model"], {}),
    (G, ["shard=3/2"], ["shard: need 0 <= i < n"], {}),
    (G, ["bias_convention=softmax"], ["bias_convention: must be one of", "algorithm1", "official"], {}),
    (G, ["rule=and", "bias=[1]", "bias_convention=official"], ["bias_convention=official is defined for rule=or only"],
     {}),
    (G, ["layout=nested"], ["layout: must be one of", "flat", "framediff"], {}),
    (G, ["time_grid=log"], ["time_grid: must be one of", "framediff"], {}),
    (G, ["compile=maybe"], ["compile: must be one of", "auto", "true", "false"], {}),
    (G, ["compile_mode=max-autotune"], ["compile_mode: must be one of", "reduce-overhead"], {}),
    (G, ["device=cuda"], ["CUDA was requested but no CUDA device"], {"cuda_absent": True}),
    (G, ["out_dir={in}/afile"], ["out_dir", "is not a directory"], {}),
    (G, ["out_dir=/dev/null/x"], ["'/dev/null' is not a directory"], {}),
    # ---- evaluate_backbones
    (E, [], ["samples_dir is required"], {"base": False}),
    (E, ["foo=1"], ["unknown option 'foo'", "valid options"], {"sub": True}),
    (E, ["mpnn.foo=1"], ["unknown option 'mpnn.foo'", "num_seqs"], {}),
    (E, ["--verbose"], ["unknown flag(s) --verbose"], {}),
    (E, ["samples_dir=/definitely/not/here"], ["is not a directory"], {}),
    (E, ["samples_dir={in}/empty_dir"], ["no structure files"], {}),
    (E, ["samples_dir={in}/one_residue"], ["no usable structure", "1 residue(s)", "at least 3"], {}),
    (E, ["out_dir={in}/afile"], ["out_dir", "exists and is not a directory"], {}),
    (E, ["out_dir=/dev/null/x"], ["'/dev/null' is not a directory"], {}),
    (E, ["device=cuda"], ["CUDA was requested but no CUDA device"], {"cuda_absent": True}),
    (E, ["mpnn.num_seqs=0"], ["mpnn.num_seqs must be an integer in [1,"], {}),
    (E, ["workers=-3"], ["workers must be an integer in [0,"], {}),
    (E, ["mpnn.temperature=nan"], ["mpnn.temperature must be a finite number"], {}),
    (E, ["diversity.cluster_method=ward"], ["diversity.cluster_method must be one of"], {}),
    (E, ["sc_results=maybe"], ["sc_results must be one of", "auto"], {}),
    (E, ["reference=/no/such/reference"], ["reference", "does not exist"], {}),
    (E, ["mpnn.weights={in}/nope.pt"], ["mpnn.weights", "is not a file"], {}),
    (E, ["mpnn.weights={in}/hostile.pt"], ["mpnn.weights", "refused"], {}),
    # ---- prepare_dataset
    (P, [], ["input_dir is required"], {"base": False}),
    (P, ["foo=1"], ["unknown option 'foo'", "min_length"], {"sub": True}),
    (P, ["input_dir=/no/such/dir"], ["input_dir does not exist"], {}),
    (P, ["output=/dev/null/x.pt"], ["'/dev/null' is not a directory"], {}),
    (P, ["output={in}/adir"], ["is a directory; give a file name"], {}),
    (P, ["min_length=abc"], ["min_length must be an integer"], {}),
    (P, ["min_length=50", "max_length=10"], ["min_length 50 > max_length 10"], {}),
    (P, ["split=halves"], ["split must be 'ss' or null"], {}),
    (P, ["input_dir={in}/one_residue"], ["no chain left"], {}),
    # ---- train_frame_model
    (T, ["foo=1"], ["unknown option 'foo'", "experiment"], {"sub": True}),
    (T, ["--nope"], ["unknown flag(s) --nope"], {}),
    (T, ["model=huge"], ["model=huge: no such model config", "tiny"], {}),
    (T, ["out_dir={in}/afile"], ["out_dir", "exists and is not a directory"], {}),
    (T, ["out_dir=/dev/null/x"], ["'/dev/null' is not a directory"], {}),
    (T, ["experiment.learning_rate=nan"], ["experiment.learning_rate must be a finite number"], {}),
    (T, ["experiment.learning_rate=0"], ["experiment.learning_rate must be > 0"], {}),
    (T, ["experiment.bond_loss_weight=-1"], ["experiment.bond_loss_weight must be >= 0"], {}),
    (T, ["experiment.bond_loss_t_filter=2"], ["bond_loss_t_filter in [0, 1]"], {}),
    (T, ["max_steps=1.5"], ["max_steps must be an integer"], {}),
    (T, ["data.min_t=abc"], ["data.min_t must be a number"], {}),
    (T, ["trainer.accelerator=gpu"], ["no CUDA GPU is available"], {"cuda_absent": True}),
    (T, ["trainer.precision=99"], ["trainer: Precision 99 is invalid"], {}),
    (T, ["data.path={in}/nope.pt"], ["dataset file", "not found"], {}),
    (T, ["data.path={in}/hostile.pt"], ["refused"], {}),
    (T, ["out_dir={tmp}/run", "resume=true"], ["resume:", "truncated"], {"setup": _resume_dir("truncated")}),
    (T, ["out_dir={tmp}/run", "resume=true"], ["resume:", "refused"], {"setup": _resume_dir("hostile")}),
    (T, ["out_dir={tmp}/run", "resume=true"], ["resume:", "empty"], {"setup": _resume_dir("empty")}),
    (T, ["out_dir={tmp}/run"], ["last.ckpt exists: pass resume=true"], {"setup": _existing_run}),
    # ---- generate_images / train_image_model
    (GI, [], ["model_path is required"], {"base": False}),
    (GI, ["foo=1"], ["unknown option 'foo'", "model_path"], {"sub": True}),
    (GI, ["model_path={in}/nope"], ["model_path", "does not exist"], {}),
    (GI, ["model_path={in}/adir"], ["model_index.json"], {}),
    (GI, ["out_dir=/dev/null/x"], ["'/dev/null' is not a directory"], {}),
    # old spellings (one release): the same errors after one "deprecated ... use NEW=" line; both spellings: exit 2
    (GI, ["model_path={in}/adir", "output_dir=/dev/null/x"], ["'/dev/null' is not a directory"],
     {"base": False, "deprecated": "out_dir"}),
    (GI, ["lift=0.5"], ["model_index.json"], {"deprecated": "bias"}),
    (GI, ["index=1"], ["model_index.json"], {"deprecated": "single_index"}),
    (GI, ["output_dir={out}"], ["output_dir= and out_dir=", "give out_dir= only"], {}),
    (GI, ["lift=0.5", "bias=0.5"], ["give bias= only"], {"sub": True}),
    (GI, ["batch_size=0"], ["batch_size must be an integer >= 1"], {}),
    (GI, ["dtype=int8"], ["dtype must be one of"], {}),
    (GI, ["device=cuda"], ["CUDA was requested but no CUDA device"], {"cuda_absent": True}),
    (TI, ["archive={in}/nope.tar.gz"], ["archive", "not found"], {}),
    (TI, ["output=/dev/null/x"], ["'/dev/null' is not a directory"], {}),
    (TI, ["lr=nan"], ["lr must be a finite number > 0"], {}),
    (TI, ["classes=[cow]"], ["unknown CIFAR-10 class 'cow'"], {}),
    (TI, ["foo=1"], ["unknown option 'foo'"], {}),
]


def _case_id(case) -> str:
    prog, args, _, opts = case
    setup = opts.get("setup")
    tag = f"+{setup.__name__.strip('_') if setup.__name__ != 'setup' else 'resume'}" if setup else ""
    return f"{prog}:{' '.join(args) or '(no args)'}{tag}{':sub' if opts.get('sub') else ''}"


def _tree(*dirs: Path) -> dict:
    out = {}
    for d in dirs:
        for p in sorted(d.rglob("*")):
            st = p.lstat()
            out[str(p)] = (p.is_dir(), st.st_size if p.is_file() else 0, st.st_mtime_ns if p.is_file() else 0)
    return out


def _run_in_process(fn, argv, capfd) -> tuple[int, str, str]:
    capfd.readouterr()
    try:
        rc = fn(argv)
    except SystemExit as e:
        rc = e.code
    out, err = capfd.readouterr()
    return (0 if rc is None else rc), out, err


def _run_subprocess(cmd, argv, cwd: Path) -> tuple[int, str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, *cmd, *argv], capture_output=True, text=True, cwd=cwd, env=env,
                       timeout=300)
    return r.returncode, r.stdout, r.stderr


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_bad_input_one_line_exit_2_nothing_written(case, inputs, tmp_path, monkeypatch, capfd):
    prog, args, needles, opts = case
    if opts.get("cuda_absent") and CUDA:
        pytest.skip("CUDA is present: the request is valid here")
    fn, cmd, base = COMMANDS[prog]
    out = tmp_path / "out"
    if opts.get("setup"):
        opts["setup"](tmp_path, inputs)
    fill = lambda a: a.replace("{in}", str(inputs)).replace("{tmp}", str(tmp_path)).replace("{out}", str(out))  # noqa: E731
    argv = [fill(a) for a in ((base if opts.get("base", True) else []) + args)]
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    before = _tree(inputs, tmp_path)

    rc, stdout, stderr = (_run_subprocess(cmd, argv, work) if opts.get("sub") else
                          _run_in_process(fn, argv, capfd))

    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    if opts.get("deprecated"):         # an old spelling: one warning line naming the new key, then the error
        assert lines and lines[0].startswith(f"{prog}: warning: ") and "deprecated" in lines[0], stderr
        assert f"use {opts['deprecated']}=" in lines[0], lines[0]
        lines = lines[1:]
    assert rc == 2, (rc, stdout, stderr)
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr}"
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    assert "Traceback" not in stderr
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    assert stdout.strip() == "", stdout
    assert not out.exists(), f"{out} was created"
    assert _tree(inputs, tmp_path) == before, "files were written, changed or removed"
    assert not (inputs / "PAYLOAD_RAN").exists(), "code from a hostile checkpoint ran"


def test_table_covers_every_command_and_enough_inputs():
    assert len(CASES) >= 40
    assert {c[0] for c in CASES} == set(COMMANDS)
    assert all(any(o.get("sub") for p, _, _, o in CASES if p == prog) for prog in (G, E, P, T, GI))


# ------------------------------------------------------------------------------------------ documented syntaxes
@pytest.mark.parametrize("spec", ["60,80,100", "{start:60,stop:100,step:20}", "60-100:20", "[60,80,100]"])
def test_tutorial_lengths_syntaxes_work(spec, tmp_path, monkeypatch, capfd):
    """docs/tutorial.md §6: every documented way of writing lengths=... runs (exact model, one step)."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "o"
    rc, stdout, stderr = _run_in_process(_generate, ["models=[exact-helix]", f"lengths={spec}", "samples_per_length=1",
                                                     "num_steps=1", "plots=false", "progress=false",
                                                     f"out_dir={out}"], capfd)
    assert rc == 0, stderr
    assert sorted(p.name for p in out.glob("length_*")) == ["length_100", "length_60", "length_80"]


def test_help_offers_only_valid_groups(capfd):
    """generate_backbones --help lists its presets (and no other command's config group such as model=)."""
    rc, stdout, _ = _run_in_process(_generate, ["--help"], capfd)
    assert rc == 0
    presets = sorted(p.stem for p in (REPO / "configs" / "generate").glob("*.yaml"))
    assert all(p in stdout for p in presets)
    assert "model:" not in stdout.replace("models:", "") and "Exit codes" in stdout


def test_training_prints_no_noise(inputs, tmp_path):
    """A successful train_frame_model run prints none of the lines a user cannot act on: Lightning's litlogger
    advert, torch's pytree deprecation (from Lightning's code), the weights_only default note."""
    rc, stdout, stderr = _run_subprocess(["-m", "superdiff_protein.cli.train"],
                                         ["model=tiny", f"data.path={inputs / 'ds.pt'}", "data.batch_size=2",
                                          "max_steps=1", "trainer.tensorboard=false", "experiment.eval_every=0",
                                          f"out_dir={tmp_path / 'run'}"], tmp_path)
    assert rc == 0, stderr
    assert "steps 0 -> 1" in stdout
    for noise in ("litlogger", "LeafSpec", "weights_only", "Traceback", "Warning"):
        assert noise not in stderr, stderr
