"""``evaluate_backbones`` command line (Hydra overrides, e.g.
``evaluate_backbones samples_dir=out/ reference=ref.npz esmfold=/models/esmfold_v1 out_dir=out/eval``)."""
from __future__ import annotations

import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
CONFIG_NAME = "evaluate_backbones"


def load_config(overrides: list[str]):
    """Compose ``configs/evaluate_backbones.yaml`` with Hydra ``key=value`` overrides; an unknown key or an
    unparsable override raises ``eval.errors.BadInputError`` (one line)."""
    from eval.errors import BadInputError

    from .common import compose_config

    return compose_config(CONFIG_NAME, overrides, config_dir=CONFIG_DIR, error=BadInputError)


def _usage() -> str:
    return "\n".join([__doc__, f"\nConfiguration ({CONFIG_DIR / (CONFIG_NAME + '.yaml')}):\n",
                      (CONFIG_DIR / f"{CONFIG_NAME}.yaml").read_text(),
                      "Exit codes: 0 done; 1 unexpected failure; 2 bad input (one line on stderr, nothing written); "
                      "130 interrupted."])


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns/exit code 0 on success, 2 on bad input (one line on stderr, nothing written),
    1 on an unexpected failure, 130 when interrupted (superdiff_protein.cli.common)."""
    from eval.errors import BadInputError

    from .common import run_command

    def run(args: list[str]) -> None:
        from omegaconf import OmegaConf

        cfg = load_config(args)
        if OmegaConf.is_missing(cfg, "samples_dir"):
            raise BadInputError("samples_dir is required: evaluate_backbones samples_dir=/path/to/backbones")
        from eval.pipeline import evaluate, log

        summary = evaluate(cfg)
        out = cfg.out_dir or str(Path(str(cfg.samples_dir)) / "eval")
        log(f"done: {summary['n_samples']} samples ({summary['n_failed']} with errors); see {out}/metrics.csv, "
            f"summary.json, table.md")

    return run_command("evaluate_backbones", run, argv=argv, usage=_usage, error=BadInputError,
                       interrupted="interrupted (rerun to resume)")


def _entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    _entry()
