"""``evaluate_backbones`` command line (Hydra overrides, e.g.
``evaluate_backbones samples_dir=out/ reference=ref.npz esmfold=/models/esmfold_v1 out_dir=out/eval``)."""
from __future__ import annotations

import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
CONFIG_NAME = "evaluate_backbones"


def load_config(overrides: list[str]):
    """Compose ``configs/evaluate_backbones.yaml`` with Hydra ``key=value`` overrides."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name=CONFIG_NAME, overrides=overrides)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns/exit code 0 on success, 2 on bad input (one line on stderr, nothing written),
    1 on an unexpected failure, 130 when interrupted (superdiff_protein.cli.common)."""
    from .common import config_keys, guard, hydra_error_line

    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        print(f"\nConfiguration ({CONFIG_DIR / (CONFIG_NAME + '.yaml')}):\n")
        print((CONFIG_DIR / f"{CONFIG_NAME}.yaml").read_text())
        print("Exit codes: 0 done; 1 unexpected failure; 2 bad input (one line on stderr, nothing written); "
              "130 interrupted.")
        return 0

    def run() -> None:
        from hydra.errors import HydraException
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException

        from eval.errors import BadInputError

        flags = [a for a in argv if a.startswith("-")]
        if flags:
            raise BadInputError(f"unknown flag(s) {' '.join(flags)}; options are key=value (see evaluate_backbones "
                                "--help)")
        try:
            cfg = load_config(list(argv))
        except (HydraException, OmegaConfBaseException) as exc:   # unknown key, unparsable override
            raise BadInputError(hydra_error_line(exc, config_keys(CONFIG_NAME))) from exc
        if OmegaConf.is_missing(cfg, "samples_dir"):
            raise BadInputError("samples_dir is required: evaluate_backbones samples_dir=/path/to/backbones")
        from eval.pipeline import evaluate, log

        summary = evaluate(cfg)
        out = cfg.out_dir or str(Path(str(cfg.samples_dir)) / "eval")
        log(f"done: {summary['n_samples']} samples ({summary['n_failed']} with errors); see {out}/metrics.csv, "
            f"summary.json, table.md")

    return guard("evaluate_backbones", run, interrupted="interrupted (rerun to resume)")


def _entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    _entry()
