"""``generate_backbones``: sample protein backbones from a superposition of frame models.

Command line (Hydra, ``configs/generate_backbones.yaml``; every key can be overridden)::

    generate_backbones rule=or lengths=[60,100] samples_per_length=8 num_steps=200 seed=0 out_dir=runs/or
    generate_backbones generate=paper_or out_dir=runs/paper_or         # a preset (configs/generate/)

Public config keys (a contract: scripts call them): ``models``, ``rule``, ``temperature``, ``bias``,
``kappa_scope``, ``estimator``, ``num_steps``, ``min_t``, ``noise_scale``, ``lengths``,
``samples_per_length``, ``batch_size``, ``seed``, ``device``, ``precision``, ``out_dir``, ``save_traj``.
Further keys (``final``, ``sampling``, ``time_grid``, ...) are documented in the yaml file and
``docs/tutorial.md``; the schema is :class:`superdiff_protein.frames.generate_config.GenerateConfig`.

The same from Python: :func:`superdiff_protein.frames.generation.generate`. What a run writes (``layout=flat``,
the default, or FrameDiff's per-sample folders with ``layout=framediff``): :mod:`superdiff_protein.runs.rundir`.
"""
from __future__ import annotations

import sys
from typing import Any, Sequence

from ..frames.generate_config import CONFIG_NAME, GenerateConfig, option_tree, register_schema, strip_hydra
from ..frames.generation import generate_from_config
from .common import run_hydra

__all__ = ["main"]

_PROG = "generate_backbones"


def _run_from_cfg(cfg: Any) -> None:
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    print(generate_from_config(strip_hydra(config)).text())


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point ``generate_backbones`` (Hydra overrides, e.g. ``rule=and lengths=[60,100]``).

    Exit codes (``superdiff_protein.cli.common``): 0 done, 1 sampling failed (NaN), 2 bad input (one line on
    stderr, nothing written), 130 interrupted.
    """
    import signal

    from .runtime import tune_malloc

    tune_malloc()                           # reuse big freed blocks (docs/benchmarks.md, main job)

    def _on_term(signum, frame):            # let atomic writes clean up their temporary files
        raise KeyboardInterrupt

    if argv is None:
        signal.signal(signal.SIGTERM, _on_term)
    register_schema()
    code = run_hydra(_PROG, CONFIG_NAME, _run_from_cfg, argv=argv, list_keys=("lengths", "models", "bias", "weights"),
                     node=GenerateConfig, valid={**option_tree(), "generate": {}},   # generate=: the preset group
                     interrupted="interrupted; complete samples are kept, rerun the same command to resume")
    sys.exit(code)


if __name__ == "__main__":
    main()
