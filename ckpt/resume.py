"""Resuming from a checkpoint: check that it fits the model and optimizers, then restore.

Every mismatch is an :class:`~ckpt.errors.IncompatibleStateError` that names the keys,
shapes or counts that differ and says how to load anyway (``load_weights_only``).

Example::

    rng = restore(trainer.state, torch.load(path, weights_only=True), path,
                  weights_only=False, strict=True)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from .errors import CheckpointError, IncompatibleStateError
from .state import State, callback_keys, strip_ddp_prefix

__all__ = ["check_model_state", "check_optimizer_state", "restore"]

log = logging.getLogger(__name__)

#: Optimizer state entries that have one value per parameter element.
_PER_ELEMENT = {
    "exp_avg",
    "exp_avg_sq",
    "max_exp_avg_sq",
    "momentum_buffer",
    "square_avg",
    "grad_avg",
    "acc_delta",
    "sum",
    "ax",
    "prev",
    "step_size",
    "exp_inf",
    "mu_product_buf",
}


def check_model_state(model: torch.nn.Module, sd: Mapping[str, Any], strict: bool) -> None:
    """Raise IncompatibleStateError naming mismatched keys or shapes."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd
        and isinstance(sd[k], torch.Tensor)
        and isinstance(own[k], torch.Tensor)
        and sd[k].shape != own[k].shape
    ]
    problems = []
    if shapes:
        problems.append("shape mismatch: " + "; ".join(shapes[:20]))
    if strict and missing:
        problems.append("missing in checkpoint: " + ", ".join(missing[:20]))
    if strict and unexpected:
        problems.append("not in model: " + ", ".join(unexpected[:20]))
    if problems:
        raise IncompatibleStateError(
            "the checkpoint's model weights do not fit the model given to the Trainer ("
            + " | ".join(problems)
            + "). Pass the same architecture, or load_weights_only=True with load_strict=False "
            "to load the matching weights only"
        )


def check_optimizer_state(opt: torch.optim.Optimizer, sd: Mapping[str, Any], index: int) -> None:
    """Raise IncompatibleStateError when ``sd`` cannot be the state of ``opt``."""
    what = f"optimizer {index} ({type(opt).__name__})"
    groups = opt.param_groups
    saved = sd.get("param_groups", [])
    if len(saved) != len(groups):
        raise IncompatibleStateError(
            f"{what} has {len(groups)} parameter group(s) but the checkpoint has {len(saved)}"
        )
    state = sd.get("state", {})
    for gi, (g, sg) in enumerate(zip(groups, saved, strict=False)):
        if len(g["params"]) != len(sg["params"]):
            raise IncompatibleStateError(
                f"{what}: group {gi} has {len(g['params'])} parameters but the checkpoint's has "
                f"{len(sg['params'])}; the model or the parameter grouping differs"
            )
        lacking = sorted(set(g) - set(sg) - {"params"})
        if lacking:
            raise IncompatibleStateError(
                f"{what}: the checkpoint's group {gi} lacks hyperparameters {lacking}; it was "
                "saved by a different optimizer class. Use the same optimizer to resume, or "
                "load_weights_only=True to start a new optimizer"
            )
        for p, pid in zip(g["params"], sg["params"], strict=False):
            for k, v in state.get(pid, {}).items():
                if (
                    k in _PER_ELEMENT
                    and isinstance(v, torch.Tensor)
                    and v.dim() > 0
                    and v.shape != p.shape
                ):
                    raise IncompatibleStateError(
                        f"{what}: state {k!r} of parameter {pid} has shape {tuple(v.shape)} in "
                        f"the checkpoint but the parameter has shape {tuple(p.shape)}"
                    )


def restore(
    state: State, ckpt: Any, path: str, weights_only: bool, strict: bool
) -> dict[str, Any] | None:
    """Load checkpoint ``ckpt`` (read from ``path``) into ``state``.

    With ``weights_only`` only the model weights; otherwise model, optimizers,
    schedulers, scaler, callbacks and the timer, after checking that they fit.
    Returns the generators' state at the save point for a full resume (the
    training loop restores it when it continues), None for weights only.
    """
    if not isinstance(ckpt, Mapping) or "state" not in ckpt or "model" not in ckpt["state"]:
        raise CheckpointError(
            f"{path} is a torch file but not a trainer checkpoint (no ['state']['model']); "
            "to load bare weights, call model.load_state_dict(torch.load(path)) yourself"
        )
    st = ckpt["state"]
    raw = state.raw_model
    model_sd = strip_ddp_prefix(st["model"])
    check_model_state(raw, model_sd, strict=strict or not weights_only)
    if weights_only:
        raw.load_state_dict(model_sd, strict=strict)
        log.info("loaded model weights from %s", path)
        return None
    opt_states = list(st.get("optimizers", []))
    if len(opt_states) != len(state.optimizers):
        raise IncompatibleStateError(
            f"the checkpoint holds {len(opt_states)} optimizer state(s) but the Trainer has "
            f"{len(state.optimizers)} optimizer(s); pass the same optimizers to resume, or "
            "load_weights_only=True"
        )
    for i, (opt, osd) in enumerate(zip(state.optimizers, opt_states, strict=False)):
        check_optimizer_state(opt, osd, i)
    sched_states = list(st.get("schedulers", []))
    if len(sched_states) != len(state.schedulers):
        raise IncompatibleStateError(
            f"the checkpoint holds {len(sched_states)} scheduler state(s) but the Trainer has "
            f"{len(state.schedulers)} scheduler(s); pass the same schedulers to resume"
        )
    raw.load_state_dict(model_sd, strict=True)
    for i, (opt, osd) in enumerate(zip(state.optimizers, opt_states, strict=False)):
        try:
            opt.load_state_dict(osd)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise IncompatibleStateError(
                f"optimizer {i} ({type(opt).__name__}) rejected the checkpoint's state: {exc}"
            ) from None
    for s, ssd in zip(state.schedulers, sched_states, strict=False):
        s.load_state_dict(ssd)
    if state.scaler is not None and st.get("scaler"):
        state.scaler.load_state_dict(st["scaler"])
    cb_states = st.get("callbacks", {}) or {}
    for key, cb in callback_keys(state.callbacks):
        fn = getattr(cb, "load_state_dict", None)
        if key in cb_states and callable(fn):
            fn(cb_states[key])
    state.timer.load_state_dict(st["timer"])
    state.epoch_start_rng = dict(st.get("rng") or {})
    log.info("resumed from %s at epoch %d, batch %d", path, state.timer.epoch, state.timer.batch)
    return dict(ckpt.get("rng") or {})
