"""FrameDiff training as a LightningModule: the score network, its EMA copy, the loss of a batch, logging.

Like FrameFlow's ``models/flow_module.py``, next to the network. Per step ``k``:

* ``t ~ U(min_t, 1)`` per chain (a share ``low_t_frac`` from ``U(min_t, low_t_max)``: :func:`sample_t`), the
  frames noised with ``SE3Diffuser.forward_marginal``, the noise, t and the self-conditioning coin drawn from a
  generator seeded with ``(seed, k)``;
* self-conditioning: with probability ``self_condition_prob`` (official 0.5) a first pass without gradient
  predicts CA positions that are fed to the second pass;
* FrameDiff's loss (:mod:`models.framediff.losses`) on the scores of the prediction;
* after the optimizer step, the EMA update (warmed up as ``min(decay, (1+step)/(10+step))``), a
  ``metrics.csv`` row every ``log_every`` steps and a fixed-noise evaluation every ``eval_every`` steps.

The data come from :class:`models.framediff.datamodule.FrameDataModule`; :func:`models.framediff.fit.fit` runs
the Trainer. Configuration: ``configs/train_frame_model.yaml`` (composed and checked by
``superdiff_protein/cli/train.py``). Documentation: ``docs/training.md``.
"""
from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from superdiff_protein.errors import UserError
from superdiff_protein.frames.se3 import SE3Diffuser

from .adapter import FrameDiffAdapter
from .config import FrameDiffConfig
from .losses import framediff_loss, psi_targets, seq_idx
from .metrics import append_metrics
from .network import FrameDiffScoreNetwork
from .self_states import load_pool, pool_batch, self_state_loss

__all__ = ["TrainError", "build_network", "build_diffuser", "lr_lambda", "update_ema", "sample_t", "FrameDiffusionModule"]


class TrainError(RuntimeError, UserError):
    """Bad training configuration, missing data or an unusable output directory (exit code 2 in the CLI)."""


def build_network(cfg: Mapping[str, Any]) -> FrameDiffScoreNetwork:
    """The score network of the config's ``model`` section (fresh weights)."""
    return FrameDiffScoreNetwork(FrameDiffConfig.from_dict(cfg["model"]))


_DIFFUSERS: dict[str, Any] = {}


def build_diffuser(cfg: Mapping[str, Any]) -> SE3Diffuser:
    """SE3Diffuser of the config (cached per diffuser section: its IGSO(3) tables fill lazily)."""
    key = json.dumps(cfg["diffuser"], sort_keys=True)
    if key not in _DIFFUSERS:
        _DIFFUSERS[key] = SE3Diffuser.from_conf(cfg)
    return _DIFFUSERS[key]


def lr_lambda(exp: Mapping[str, Any], max_steps: int) -> Callable[[int], float]:
    """LR factor of a step: linear warm-up over ``warmup_steps``, then constant or cosine to ``min_lr_ratio``."""
    warm = int(exp.get("warmup_steps") or 0)
    sched = exp["lr_schedule"]
    floor = float(exp.get("min_lr_ratio", 0.1))

    def f(step: int) -> float:
        w = min(1.0, (step + 1) / warm) if warm > 0 else 1.0
        if sched == "cosine":
            p = min(1.0, max(0.0, (step - warm) / max(1, max_steps - warm)))
            return w * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))
        return w

    return f


def sample_t(b: int, min_t: float, low_t_frac: float, low_t_max: float, gen: torch.Generator,
             device: torch.device | str = "cpu") -> Tensor:
    """Training times of ``b`` chains: ``U(min_t, 1)``, official. With ``low_t_frac > 0`` each chain's t comes,
    with that probability, from ``U(min_t, low_t_max)`` instead: the small t where the sampler's last steps set
    the fine geometry get more of the training (docs/training.md, "Session 23"). At ``low_t_frac = 0`` no extra
    numbers are drawn, so the official stream of draws is unchanged."""
    t = min_t + (1.0 - min_t) * torch.rand(b, generator=gen, device=device)
    if low_t_frac > 0.0:
        low = min_t + (low_t_max - min_t) * torch.rand(b, generator=gen, device=device)
        coin = torch.rand(b, generator=gen, device=device) < low_t_frac
        t = torch.where(coin, low, t)
    return t


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    """``ema <- d * ema + (1 - d) * model`` with ``d = min(decay, (1+step)/(10+step))`` (the warm-up keeps early
    averages from being dominated by the initial weights); buffers are copied."""
    d = min(decay, (1 + step) / (10 + step))
    ema_p = [p for p in ema.parameters()]
    cur_p = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_p, cur_p, 1.0 - d)
    for be, bc in zip(ema.buffers(), model.buffers()):
        be.copy_(bc)


class FrameDiffusionModule(pl.LightningModule):
    """FrameDiff score network + EMA copy, trained with :func:`framediff_loss`."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = cfg
        self.model = build_network(cfg)
        decay = cfg["experiment"].get("ema_decay")
        self.ema = None
        if decay is not None:
            self.ema = copy.deepcopy(self.model)
            for p in self.ema.parameters():
                p.requires_grad_(False)
        self.diffuser = build_diffuser(cfg)
        self._acc: dict[str, list[float]] = {}
        self._last_log_time = time.time()
        self._examples = 0
        self._residues = 0
        self.metrics_path: Optional[Path] = None
        self.eval_batch: Optional[dict] = None
        self._time_offset = 0.0
        self._pool: Optional[dict] = None

    # -------------------------------------------------------------- core
    def _adapter(self, net: FrameDiffScoreNetwork) -> FrameDiffAdapter:
        return FrameDiffAdapter(net)

    def _generator(self, step: int, salt: int = 0) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed((int(self.cfg["seed"]) * 1_000_003 + step * 7919 + salt * 104_729 + 12345) % (2 ** 63))
        return g

    def compute_loss(self, net, batch: dict, gen: torch.Generator, t: Optional[Tensor] = None,
                     self_condition: Optional[bool] = None) -> dict[str, Tensor]:
        """Mean (over chains) FrameDiff loss terms for one batch; noise drawn from ``gen``."""
        exp, dcfg = self.cfg["experiment"], self.cfg["data"]
        mask = batch["res_mask"].float()
        b = mask.shape[0]
        min_t = float(dcfg["min_t"])
        if t is None:
            t = sample_t(b, min_t, float(dcfg.get("low_t_frac", 0.0)), float(dcfg.get("low_t_max", 0.1)), gen,
                         mask.device)
        rot0, trans0 = batch["rotmats"].float(), batch["trans"].float()
        noised = self.diffuser.forward_marginal(rot0, trans0, t, mask, generator=gen)
        sidx = seq_idx(batch, dcfg["seq_idx"])
        adapter = self._adapter(net)
        sc = None
        if self_condition is None:
            # the coin comes from a host generator: reading a device draw would stall the GPU queue every step
            coin = torch.Generator().manual_seed(int(gen.initial_seed()) ^ 0x5C0111)
            use_sc = float(torch.rand((), generator=coin)) < float(exp["self_condition_prob"])
        else:
            use_sc = self_condition
        if use_sc and net.cfg.embed.embed_self_conditioning:
            with torch.no_grad():
                sc = adapter(noised.rotmats_t, noised.trans_t, t, mask, None, seq_idx=sidx).self_cond_state
            sc = sc.detach().float()
        elif net.cfg.embed.embed_self_conditioning:
            # zeros are what the network uses for None; passed as a tensor, a compiled network (trainer.compile)
            # sees one input signature instead of two, and so compiles one graph fewer (about a minute each)
            sc = torch.zeros_like(noised.trans_t)
        out = adapter(noised.rotmats_t, noised.trans_t, t, mask, sc, seq_idx=sidx)
        with torch.autocast(device_type=mask.device.type, enabled=False):
            pr, ptr, psi = out.rotmats.float(), out.trans.float(), out.psi.float()
            prs, pts = self.diffuser.scores_from_prediction(
                noised.rotmats_t, noised.trans_t, pr, ptr, t, mask, pred_quats=out.quats.float())
            gt_psi, psi_mask = psi_targets(batch)
            exp2 = dict(exp, diffuse_rot=self.cfg["diffuser"]["diffuse_rot"],
                        diffuse_trans=self.cfg["diffuser"]["diffuse_trans"])
            per = framediff_loss(pr, ptr, psi, prs.float(), pts.float(),
                                 {"rotmats": rot0, "trans": trans0, "psi": gt_psi, "psi_mask": psi_mask},
                                 noised, t, mask, exp2)
        nonempty = (mask.sum(-1) > 0).float()
        denom = nonempty.sum() + 1e-10
        return {k: (v * nonempty).sum() / denom for k, v in per.items()}

    def _self_state_pool(self) -> Optional[dict]:
        """The pool of ``experiment.self_state_path`` on this device (read once), or None when the term is off."""
        exp = self.cfg["experiment"]
        if not float(exp.get("self_state_weight") or 0.0) > 0:
            return None
        if self._pool is None:
            try:
                pool = load_pool(exp["self_state_path"])
            except (OSError, ValueError) as e:
                raise TrainError(f"experiment.self_state_path: {e}") from None
            self._pool = {k: v.to(self.device) for k, v in pool.items()}
        return self._pool

    def self_state_terms(self, net, step: int) -> dict[str, Tensor]:
        """Mean self-state loss terms (:mod:`models.framediff.self_states`) on the pool batch of ``step``."""
        pool = self._self_state_pool()
        exp = self.cfg["experiment"]
        s = int(pool["t"].shape[0])
        g = torch.Generator().manual_seed((int(self.cfg["seed"]) * 1_000_003 + step * 7919 + 424_242) % (2 ** 63))
        idx = torch.randint(s, (int(exp.get("self_state_batch", 32)),), generator=g).to(self.device)
        b = pool_batch(pool, idx, self.device)
        out = self._adapter(net)(b["rot_t"], b["trans_t"], b["t"], b["mask"], b["sc"])
        with torch.autocast(device_type=b["mask"].device.type, enabled=False):
            per = self_state_loss(out.rotmats.float(), out.trans.float(), b, exp)
        return {k: v.mean() for k, v in per.items()}

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        gen = self._generator(int(self.global_step))
        losses = self.compute_loss(self.model, batch, gen)
        if self._self_state_pool() is not None:
            terms = self.self_state_terms(self.model, int(self.global_step))
            losses = dict(losses, loss=losses["loss"] + float(self.cfg["experiment"]["self_state_weight"])
                          * terms["loss"], **{f"self_{k}": v for k, v in terms.items()})
        # Nothing here reads a device value: the loss terms stay on the device until the next metrics row
        # (one host sync per log_every steps), where a non-finite loss stops the run (_check_finite).
        for k, v in losses.items():
            self._acc.setdefault(k, []).append(v.detach())
        self._examples += int(batch["res_mask"].shape[0])
        self._residues = self._residues + batch["res_mask"].sum()
        return losses["loss"]

    def on_before_optimizer_step(self, optimizer) -> None:
        if (int(self.global_step) + 1) % int(self.cfg["experiment"]["log_every"]) == 0:
            norms = [p.grad.detach().float().norm() for p in self.model.parameters() if p.grad is not None]
            if norms:
                self._acc.setdefault("grad_norm", []).append(torch.stack(norms).norm())

    def _acc_means(self) -> dict[str, float]:
        """Means of the values accumulated since the last metrics row (the one host read of them)."""
        return {k: float(torch.stack(v).float().mean()) for k, v in self._acc.items() if v}

    def _check_finite(self, means: Mapping[str, float], step: int) -> None:
        """Stop with :class:`TrainError` when a logged loss is not finite (checked once per metrics row)."""
        bad = {k: v for k, v in means.items() if k.endswith("loss") and not math.isfinite(v)}
        if bad:
            raise TrainError(f"non-finite loss in the {self.cfg['experiment']['log_every']} steps before step "
                             f"{step}: " + ", ".join(f"{k}={v:.4g}" for k, v in means.items()))

    def _update_ema(self) -> None:
        if self.ema is not None:
            update_ema(self.ema, self.model, float(self.cfg["experiment"]["ema_decay"]), int(self.global_step))

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self._update_ema()
        step = int(self.global_step)
        exp = self.cfg["experiment"]
        if step % int(exp["log_every"]) == 0:
            self._write_row(step)
        ev = int(exp.get("eval_every") or 0)
        if ev > 0 and step % ev == 0:
            self._evaluate(step)

    # -------------------------------------------------------------- logging
    def _write_row(self, step: int, extra: Optional[dict] = None) -> None:
        now = time.time()
        row: dict[str, Any] = {"step": step, "epoch": self._data_epoch(step),
                               "train_min": round(self.train_minutes(), 3)}
        means = self._acc_means()
        self._check_finite(means, step)
        row.update(means)
        opt = self.optimizers()
        if not isinstance(opt, list):
            row["lr"] = opt.param_groups[0]["lr"]
        dt = max(now - self._last_log_time, 1e-9)
        if self._examples:
            row["chains_per_s"] = self._examples / dt
            row["residues_per_s"] = float(self._residues) / dt
        if extra:
            row.update(extra)
        self._acc, self._examples, self._residues, self._last_log_time = {}, 0, 0, now
        if self.trainer.is_global_zero and self.metrics_path is not None:
            append_metrics(self.metrics_path, row)
        for lg in self.trainer.loggers:
            lg.log_metrics({k: v for k, v in row.items() if k != "step"}, step=step)

    def _data_epoch(self, step: int) -> int:
        try:
            sampler = self.trainer.train_dataloader.batch_sampler
            return sampler.position(max(step - 1, 0))[0]
        except Exception:  # noqa: BLE001
            return -1

    @torch.no_grad()
    def _evaluate(self, step: int) -> None:
        if self.eval_batch is None:
            return
        batch = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in self.eval_batch.items()}
        b = batch["res_mask"].shape[0]
        tt = torch.linspace(float(self.cfg["data"]["min_t"]), 1.0, b + 2, device=self.device)[1:-1]
        res = {}
        nets = [("eval", self.model)] + ([("eval_ema", self.ema)] if self.ema is not None else [])
        for name, net in nets:
            was = net.training
            net.eval()
            # eager even under trainer.compile: the evaluation batch's shape and eval mode would each cost a
            # compile of their own (about a minute on a GPU) for a call made once every eval_every steps
            with torch.compiler.set_stance("force_eager"):
                ls = self.compute_loss(net, batch, self._generator(0, salt=1), t=tt, self_condition=False)
            net.train(was)
            res[f"{name}_loss"] = float(ls["loss"])
            res[f"{name}_rot_loss"] = float(ls["rot_loss"])
            res[f"{name}_trans_loss"] = float(ls["trans_loss"])
        row = {"step": step, "epoch": self._data_epoch(step), "train_min": round(self.train_minutes(), 3), **res}
        if self.trainer.is_global_zero and self.metrics_path is not None:
            append_metrics(self.metrics_path, row)
        for lg in self.trainer.loggers:
            lg.log_metrics(res, step=step)

    # -------------------------------------------------------------- optim / ckpt
    def configure_optimizers(self):
        exp = self.cfg["experiment"]
        opt = torch.optim.AdamW(self.model.parameters(), lr=float(exp["learning_rate"]),
                                weight_decay=float(exp.get("weight_decay") or 0.0)) \
            if float(exp.get("weight_decay") or 0.0) > 0 else \
            torch.optim.Adam(self.model.parameters(), lr=float(exp["learning_rate"]))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(exp, int(self.cfg["max_steps"])))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_start(self) -> None:
        self._fit_start = time.time()
        self._last_log_time = self._fit_start
        if int(self.global_step) == 0:
            self._evaluate(0)

    def train_minutes(self) -> float:
        """Training wall-clock minutes so far, summed over resumed chunks (startup excluded)."""
        start = getattr(self, "_fit_start", None)
        return (self._time_offset + (time.time() - start if start else 0.0)) / 60.0

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # the losses since the last metrics row have not been looked at yet: never save a diverged state
        self._check_finite(self._acc_means(), int(self.global_step))
        checkpoint["superdiff_config"] = copy.deepcopy(self.cfg)
        checkpoint["superdiff_train_seconds"] = 60.0 * self.train_minutes()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._time_offset = float(checkpoint.get("superdiff_train_seconds", 0.0))
