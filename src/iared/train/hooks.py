"""Training hooks of the reducer contract (:class:`iared.reducers.registry.Method`'s ``train``).

``train(job, backbone, train_set, knob, progress) -> (model, info)``: the method's reducers trained on
the frozen ``backbone`` (or loaded from the job's cache / checkpoint), wrapping the method's own trainer
(:mod:`iared.train.interpreters`, :mod:`iared.train.dynamicvit`); ``job`` carries the shared settings
(steps, batch, seed, device, out, task: :class:`iared.compare.CompareConfig`'s fields); ``knob`` is None for
methods trained once for their whole sweep and the knob for ``knob_in_weights`` methods.
"""

from __future__ import annotations

from pathlib import Path


def train_iared(cfg, backbone, train_set, knob, progress):
    """IA-RED²'s interpreters on this backbone: loaded (``iared_checkpoint``) or trained here."""
    import time

    from iared.pruning import load_pruned

    if cfg.iared_checkpoint:
        model = load_pruned(cfg.iared_checkpoint)
        diff = max(float((a - b.to(a.device)).abs().max()) for a, b in  # the backbone may be on --device already
                   zip(model.backbone.state_dict().values(), backbone.state_dict().values()))
        if diff > 1e-6:
            raise ValueError(f"--iared-checkpoint {cfg.iared_checkpoint}: its backbone differs from the compared "
                             f"one (max weight difference {diff:.2e}); every method must run on the same backbone")
        return model.to(cfg.device).eval(), {"loaded": Path(cfg.iared_checkpoint).name}
    from iared.train.interpreters import InterpreterTrainConfig, default_reward, default_tau, train_on_backbone

    tcfg = InterpreterTrainConfig(task=cfg.task, out=str(Path(cfg.out) / "iared"), steps_per_stage=cfg.train_steps,
                                  tau=default_tau(cfg.task), reward=default_reward(cfg.task),
                                  batch_size=cfg.train_batch, seed=cfg.seed, eval_samples=min(200, cfg.test_samples),
                                  eval_every=max(cfg.train_steps, 1), device=cfg.device)
    progress(f"training IA-RED² interpreters: {cfg.train_steps} steps per stage, batch {cfg.train_batch}")
    resumed = (Path(tcfg.out) / "train_state.pt").is_file()
    t0 = time.perf_counter()
    model = train_on_backbone(backbone, train_set, tcfg, resume=True)
    # seconds: this run's share only when it resumed an earlier run's state (see resumed)
    info = {"steps": cfg.train_steps * model.num_stages, "steps_per_stage": cfg.train_steps,
            "batch": cfg.train_batch, "seconds": round(time.perf_counter() - t0, 1), "resumed": resumed,
            "backbone": "frozen"}
    return model.eval(), info


def train_dynamicvit(cfg, backbone, train_set, knob, progress):
    """DynamicViT's predictors for keep ``ratio`` on the frozen backbone: loaded from
    ``out/dynamicvit`` when an earlier run with the same settings left them, else trained here."""
    import time

    from iared.compare import DYNAMICVIT_LR, load_cached, save_cached, settings_of, weights_sha1
    from iared.reducers.dynamicvit import build_dynamicvit
    from iared.train.dynamicvit import train_dynamicvit

    ratio = knob

    steps = cfg.train_steps * 3  # as many optimiser steps as IA-RED²'s three stages together
    settings = {"method": "dynamicvit", "keep_ratio": ratio, "steps": steps, "batch": cfg.train_batch,
                "lr": DYNAMICVIT_LR, "seed": cfg.seed, "task": cfg.task, "backbone_sha1": weights_sha1(backbone)}
    path = Path(cfg.out) / "dynamicvit" / f"keep{ratio:g}.safetensors"
    info = {"keep_ratio": ratio, "steps": steps, "batch": cfg.train_batch, "backbone": "frozen"}
    saved = load_cached(path, settings)
    if saved is not None:
        progress(f"DynamicViT (keep {ratio}): loaded from {path}")
        model = build_dynamicvit(backbone, ratio).to(cfg.device)  # fresh predictors are made on the CPU
        model.reducers.load_state_dict(saved)
        return model.eval(), {**info, "loaded": True, "seconds": float(settings_of(path).get("seconds", 0))}
    progress(f"training DynamicViT (keep {ratio}): {steps} steps, batch {cfg.train_batch}")
    t0 = time.perf_counter()
    # the backbone stays frozen (backbone_lr 0), so the shared one serves: only the predictors learn
    model = train_dynamicvit(backbone, train_set, keep_ratio=ratio, steps=steps, batch_size=cfg.train_batch,
                             lr=DYNAMICVIT_LR, seed=cfg.seed, device=cfg.device, progress=True)
    info["seconds"] = round(time.perf_counter() - t0, 1)
    save_cached(path, model.reducers.state_dict(), {**settings, "seconds": info["seconds"]})
    return model.eval(), info
