"""Image diffusion models (diffusers) as score models of the superposition core.

* :mod:`models.image.adapters` -- schedules from diffusers scheduler configs, the image space, the
  pixel-UNet adapter and the multi-prompt Stable Diffusion group (one batched UNet call per step).
* :mod:`models.image.pipeline` -- :class:`SuperDiffPipeline`, a diffusers-style pipeline.
* :mod:`models.image.cifar` -- the CIFAR-10 python-pickle archive reader and Lightning training.

See ``docs/images.md``.
"""
from .adapters import (ImageModelError, ImageSpace, PromptGroup, UNetScoreModel, model_output_to_eps,
                       schedule_from_scheduler, image_space, t_to_timestep)

__all__ = ["ImageModelError", "ImageSpace", "PromptGroup", "UNetScoreModel", "model_output_to_eps",
           "schedule_from_scheduler", "image_space", "t_to_timestep"]
