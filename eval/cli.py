"""``evaluate_backbones`` command line (Hydra overrides, e.g.
``evaluate_backbones samples_dir=out/ reference=ref.npz esmfold=/models/esmfold_v1 out_dir=out/eval``)."""
from __future__ import annotations

import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIG_NAME = "evaluate_backbones"


def load_config(overrides: list[str]):
    """Compose ``configs/evaluate_backbones.yaml`` with Hydra ``key=value`` overrides."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name=CONFIG_NAME, overrides=overrides)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns/exit code 0 on success, 2 on bad input, 1 on unexpected failure."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        print(f"\nConfiguration ({CONFIG_DIR / (CONFIG_NAME + '.yaml')}):\n")
        print((CONFIG_DIR / f"{CONFIG_NAME}.yaml").read_text())
        return 0
    from .errors import EvalError

    try:
        try:
            cfg = load_config(argv)
        except Exception as exc:  # hydra override / config errors
            raise EvalBadArgs(f"bad arguments {argv}: {exc}") from exc
        from omegaconf import OmegaConf

        if OmegaConf.is_missing(cfg, "samples_dir"):
            raise EvalBadArgs("samples_dir is required: evaluate_backbones samples_dir=/path/to/backbones")
        from .pipeline import evaluate, log

        summary = evaluate(cfg)
        out = cfg.out_dir or str(Path(str(cfg.samples_dir)) / "eval")
        log(f"done: {summary['n_samples']} samples ({summary['n_failed']} with errors); see {out}/metrics.csv, "
            f"summary.json, table.md")
        return 0
    except EvalError as exc:
        print(f"evaluate_backbones: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("evaluate_backbones: interrupted (rerun to resume)", file=sys.stderr)
        return 130


from .errors import BadInputError as EvalBadArgs  # noqa: E402


def _entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    _entry()
