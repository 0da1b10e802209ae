"""The ProSparse recipe: SiLU → ReLU, progressive L1 regularization of x1 = act(gate) ⊙ up,
then FATReLU threshold shifting chosen on held-out text."""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from . import data as data_mod
from . import model as model_mod
from . import schedule as sched_mod

DEFAULT_THRESHOLDS = (0.0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1)
_SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Config:
    model: str
    out_dir: str
    data: List[str]
    steps: Optional[int] = None
    schedule: str = sched_mod.DEFAULT
    final_lambda: Optional[float] = None
    eval_data: Optional[List[str]] = None
    eval_fraction: float = 0.05
    max_eval_seqs: int = 64
    text_field: str = "text"
    seq_len: int = 256
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 5e-5
    min_lr_ratio: float = 0.1
    warmup_steps: Optional[int] = None
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    distill: float = 0.0              # weight of KL(dense teacher ‖ student); 0 = off
    threshold: str = "auto"           # FATReLU t: a number, or "auto" (sweep, then pick)
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS
    max_ppl_increase: float = 0.01    # "auto": largest t whose ppl is within this of t = 0
    save_every: int = 0               # checkpoint every N steps (0: only at the end)
    resume: bool = False
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"               # autocast: auto | bf16 | fp32
    save_dtype: str = "float32"
    threads: Optional[int] = None
    sweep_lambdas: Optional[List[float]] = None
    target_sparsity: Optional[float] = None
    sweep_steps: Optional[int] = None
    sweep_only: bool = False
    baseline: bool = False            # keep the original activation, no L1: the fair dense baseline
    progress: bool = True


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_autocast(name: str, device: torch.device) -> Optional[torch.dtype]:
    if name == "fp32":
        return None
    if name == "bf16":
        return torch.bfloat16
    if name != "auto":
        raise ValueError(f"--dtype must be auto, bf16 or fp32, got {name!r}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    # CPU bf16 matmuls are only fast with native bf16 instructions (AVX512-BF16 / AMX)
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None


def lr_at(step: int, cfg: Config, steps: int) -> float:
    warm = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, steps // 20)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    f = (step - warm) / max(1, steps - warm)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, f))))


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))


def kl_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) per token, averaged over tokens."""
    s = F.log_softmax(student.float(), -1)
    t = F.log_softmax(teacher.float(), -1)
    return (t.exp() * (t - s)).sum(-1).mean()


class _Counting(torch.nn.Module):
    """Wraps the dense model's SiLU to count exact zeros (for the 'before' sparsity)."""

    def __init__(self, fn):
        super().__init__()
        self.fn, self.zeros, self.count = fn, 0, 0

    def forward(self, x):
        y = self.fn(x)
        self.zeros += int((y == 0).sum())
        self.count += y.numel()
        return y


@torch.no_grad()
def evaluate(model, blocks: torch.Tensor, device, autocast, batch_size: int,
             sparsifier: Optional[model_mod.Sparsifier] = None) -> Dict[str, float]:
    """Held-out perplexity (exp of the mean token NLL) and FFN sparsity (fraction of zero
    activations over all tokens, neurons and layers)."""
    model.eval()
    wrapped = []
    if sparsifier is None:
        for layer in model.model.layers:
            wrapped.append(_Counting(layer.mlp.act_fn))
            layer.mlp.act_fn = wrapped[-1]
    else:
        sparsifier.start(l1=False)
    nll, n = 0.0, 0
    try:
        for i in range(0, len(blocks), batch_size):
            ids = blocks[i:i + batch_size].to(device)
            with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                logits = model(input_ids=ids).logits
            k = ids[:, 1:].numel()
            nll += float(lm_loss(logits, ids)) * k
            n += k
    finally:
        if sparsifier is None:
            zeros, count = sum(w.zeros for w in wrapped), sum(w.count for w in wrapped)
            for layer, w in zip(model.model.layers, wrapped):
                layer.mlp.act_fn = w.fn
            sparsity = zeros / count if count else float("nan")
        else:
            sparsity = sparsifier.sparsity()
            sparsifier.stop()
    return {"ppl": math.exp(nll / n), "loss": nll / n, "sparsity": sparsity, "tokens": n}


class _Dense:
    """The Sparsifier's interface for --baseline: the original activation stays, the L1 term is 0."""

    def start(self, l1: bool = False) -> None:
        pass

    def stop(self) -> None:
        pass

    def l1(self) -> torch.Tensor:
        return torch.zeros(())

    def sparsity(self) -> float:
        return 0.0


class Trainer:
    """One training run over ``steps`` optimizer steps of ``batch_size × grad_accum`` sequences."""

    def __init__(self, loaded: model_mod.Loaded, sparsifier: model_mod.Sparsifier, cfg: Config,
                 sched: sched_mod.Schedule, train_blocks: torch.Tensor, device, autocast,
                 teacher=None, ckpt_dir: Optional[Path] = None, desc: str = "sparsify"):
        self.loaded, self.sp, self.cfg, self.sched = loaded, sparsifier, cfg, sched
        self.model = loaded.model
        self.blocks, self.device, self.autocast, self.teacher = train_blocks, device, autocast, teacher
        self.steps = sched.total_steps
        self.ckpt_dir, self.desc = ckpt_dir, desc
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
        self.step = 0
        self.history: List[Dict[str, float]] = []
        self.wall = 0.0
        self._perms: Dict[int, torch.Tensor] = {}

    # deterministic order: a fresh permutation per epoch, so resuming needs only the step
    def _batch(self, step: int, micro: int) -> torch.Tensor:
        bs, n = self.cfg.batch_size, len(self.blocks)
        first = (step * self.cfg.grad_accum + micro) * bs
        rows = []
        for i in range(first, first + bs):
            epoch = i // n
            if epoch not in self._perms:
                g = torch.Generator().manual_seed(self.cfg.seed * 100003 + epoch)
                self._perms = {epoch: torch.randperm(n, generator=g)}
            rows.append(self._perms[epoch][i % n])
        return self.blocks[torch.stack(rows)]

    def state(self) -> Dict:
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "step": self.step,
                "history": self.history, "wall": self.wall, "schedule": list(self.sched.stages),
                "config": {k: getattr(self.cfg, k) for k in ("seq_len", "batch_size", "grad_accum", "lr", "seed", "distill")},
                "n_train_blocks": len(self.blocks)}

    def save_checkpoint(self) -> None:
        if self.ckpt_dir is None:
            return
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.ckpt_dir / "state.pt.tmp"
        torch.save(self.state(), tmp)
        os.replace(tmp, self.ckpt_dir / "state.pt")  # a checkpoint on disk is always complete

    def load_checkpoint(self, path: Path) -> None:
        st = torch.load(path, map_location="cpu", weights_only=False)
        mine = self.state()
        for key in ("schedule", "config", "n_train_blocks"):
            if st[key] != mine[key]:
                raise ValueError(f"checkpoint {path} was made with a different {key} "
                                 f"({st[key]} vs now {mine[key]}): resume with the same arguments and data")
        self.model.load_state_dict(st["model"])
        if self.loaded.tied:
            self.model.tie_weights()
        self.opt.load_state_dict(st["optimizer"])
        self.step, self.history, self.wall = st["step"], st["history"], st["wall"]

    def run(self, stop_at: Optional[int] = None) -> None:
        """Train to the end of the schedule (or until step ``stop_at``, for tests and sweeps)."""
        from tqdm.auto import tqdm

        cfg, model = self.cfg, self.model
        model.train()
        bar = tqdm(total=self.steps, initial=self.step, desc=self.desc, disable=not cfg.progress,
                   dynamic_ncols=True)
        t_last = time.time()
        end = self.steps if stop_at is None else min(stop_at, self.steps)
        while self.step < end:
            step = self.step
            lam = self.sched.value(step)
            lr = lr_at(step, cfg, self.steps)
            for g in self.opt.param_groups:
                g["lr"] = lr
            self.sp.start(l1=True)
            tot = {"loss": 0.0, "lm_loss": 0.0, "l1": 0.0, "kl": 0.0}
            for micro in range(cfg.grad_accum):
                ids = self._batch(step, micro).to(self.device)
                with torch.autocast(self.device.type, dtype=self.autocast or torch.float32,
                                    enabled=self.autocast is not None):
                    logits = model(input_ids=ids).logits
                    t_logits = None
                    if self.teacher is not None:
                        with torch.no_grad():
                            t_logits = self.teacher(input_ids=ids).logits
                lm = lm_loss(logits, ids)
                l1 = self.sp.l1()
                loss = lm + lam * l1
                kl = torch.zeros(())
                if t_logits is not None:
                    kl = kl_loss(logits, t_logits)
                    loss = (1 - cfg.distill) * lm + cfg.distill * kl + lam * l1
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss became {float(loss)} at step {step} (λ={lam:g}, lr={lr:g}): "
                                             "lower --lr or λ")
                (loss / cfg.grad_accum).backward()
                for k, v in (("loss", loss), ("lm_loss", lm), ("l1", l1), ("kl", kl)):
                    tot[k] += float(v.detach() if torch.is_tensor(v) else v) / cfg.grad_accum
            sparsity = self.sp.sparsity()
            self.sp.stop()
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            now = time.time()
            self.wall += now - t_last
            t_last = now
            self.step += 1
            rec = {"step": step, "lambda": lam, "lr": lr, "sparsity": sparsity, **tot}
            self.history.append(rec)
            bar.set_postfix(loss=f"{tot['loss']:.3f}", lam=f"{lam:.3g}", sparsity=f"{sparsity:.1%}")
            bar.update(1)
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.steps:
                self.save_checkpoint()
        bar.close()
        model.eval()

    @property
    def tokens_trained(self) -> int:
        return self.step * self.cfg.batch_size * self.cfg.grad_accum * self.cfg.seq_len


def threshold_sweep(loaded, sp, eval_blocks, device, autocast, cfg: Config) -> List[Dict[str, float]]:
    rows = []
    for t in sorted(set(float(x) for x in cfg.thresholds) | {0.0}):
        sp.set_threshold(t)
        r = evaluate(loaded.model, eval_blocks, device, autocast, cfg.batch_size, sp)
        rows.append({"threshold": t, **r})
    sp.set_threshold(0.0)
    return rows


def choose_threshold(rows: List[Dict[str, float]], max_increase: float) -> float:
    """The largest t whose held-out perplexity is within ``max_increase`` (relative) of ReLU's."""
    base = next(r["ppl"] for r in rows if r["threshold"] == 0.0)
    ok = [r["threshold"] for r in rows if r["ppl"] <= base * (1 + max_increase)]
    return max(ok)


def _schedule(cfg: Config, steps: Optional[int], final_lambda: Optional[float]) -> sched_mod.Schedule:
    s = sched_mod.parse(cfg.schedule, steps)
    return s.scaled_lambda(final_lambda) if final_lambda is not None else s


def lambda_sweep(loaded, sp, cfg: Config, train_blocks, eval_blocks, device, autocast) -> Dict:
    """Short runs of the same schedule shape, each ending at one candidate final λ; returns the
    smallest λ whose held-out sparsity (ReLU, t = 0) reaches the target. Final sparsity depends
    mainly on the last stage's λ, so this calibrates the L1 reduction to a model and corpus."""
    if not cfg.sweep_lambdas:
        raise ValueError("the λ sweep needs candidate values (--sweep-lambdas)")
    if cfg.target_sparsity is None or not 0 < cfg.target_sparsity < 1:
        raise ValueError("the λ sweep needs --target-sparsity in (0, 1)")
    steps = cfg.sweep_steps or max(10, (cfg.steps or 100) // 10)
    initial = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
    rows = []
    for lam in sorted(cfg.sweep_lambdas):
        loaded.model.load_state_dict(initial)
        sched = _schedule(cfg, steps, lam)
        tr = Trainer(loaded, sp, cfg, sched, train_blocks, device, autocast, desc=f"sweep λ={lam:g}")
        tr.run()
        r = evaluate(loaded.model, eval_blocks, device, autocast, cfg.batch_size, sp)
        rows.append({"final_lambda": lam, "steps": steps, **r})
    loaded.model.load_state_dict(initial)
    if loaded.tied:
        loaded.model.tie_weights()
    reach = [r["final_lambda"] for r in rows if r["sparsity"] >= cfg.target_sparsity]
    chosen = min(reach) if reach else max(r["final_lambda"] for r in rows)
    return {"target_sparsity": cfg.target_sparsity, "rows": rows, "chosen": chosen, "reached": bool(reach)}


def plot(history: List[Dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    ax[0].plot(steps, [h["sparsity"] for h in history], color="tab:green")
    ax[0].set_ylabel("FFN sparsity (train batch)")
    ax[0].set_ylim(0, 1)
    ax[1].plot(steps, [h["lm_loss"] for h in history], label="LM loss")
    ax[1].plot(steps, [h["loss"] for h in history], label="total loss", alpha=0.7)
    ax[1].set_ylabel("loss")
    ax[1].legend()
    ax[2].plot(steps, [h["lambda"] for h in history], color="tab:red")
    ax[2].set_ylabel("λ")
    ax[2].set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(cfg: Config, log=print) -> Dict:
    """The whole recipe; returns the report also written to out_dir/sparsify_report.json."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out_dir)
    ckpt_dir = out / "checkpoint"
    if (ckpt_dir / "state.pt").exists() and not cfg.resume:
        raise ValueError(f"{out} already holds a training checkpoint: pass --resume to continue it, "
                         "or choose another output directory")
    sched = _schedule(cfg, cfg.steps, cfg.final_lambda)  # validate before the slow load
    data_mod.read_documents(cfg.data, cfg.text_field)
    if cfg.eval_data:
        data_mod.read_documents(cfg.eval_data, cfg.text_field)
    if cfg.baseline and cfg.sweep_lambdas:
        raise ValueError("--baseline trains without L1: a λ sweep makes no sense with it")
    if cfg.threshold != "auto":
        try:
            float(cfg.threshold)
        except ValueError:
            raise ValueError(f"--threshold must be a number or 'auto', got {cfg.threshold!r}") from None
    device = pick_device(cfg.device)
    autocast = pick_autocast(cfg.dtype, device)
    save_dtype = _SAVE_DTYPES.get(cfg.save_dtype)
    if save_dtype is None:
        raise ValueError(f"--save-dtype must be float32, bfloat16 or float16, got {cfg.save_dtype!r}")

    t0 = time.time()
    loaded = model_mod.load(cfg.model)
    train_blocks, eval_blocks = data_mod.load_blocks(
        loaded.tokenizer, cfg.data, cfg.seq_len, cfg.eval_fraction, cfg.eval_data, cfg.seed, cfg.text_field)
    eval_blocks = eval_blocks[: cfg.max_eval_seqs]
    loaded.model.to(device)
    log(f"loaded {cfg.model} ({loaded.arch}, {sum(p.numel() for p in loaded.model.parameters()) / 1e6:.1f}M params) "
        f"in {time.time() - t0:.0f}s; {len(train_blocks)} train / {len(eval_blocks)} eval sequences of "
        f"{cfg.seq_len}; device {device}, autocast {autocast}")

    report: Dict = {"config": asdict(cfg), "arch": loaded.arch, "device": str(device),
                    "autocast": str(autocast), "train_sequences": len(train_blocks),
                    "eval_tokens": int(eval_blocks[:, 1:].numel())}
    report["before"] = evaluate(loaded.model, eval_blocks, device, autocast, cfg.batch_size)
    log(f"before (dense, original activation): ppl {report['before']['ppl']:.3f}, "
        f"sparsity {report['before']['sparsity']:.1%}")
    teacher = model_mod.clone_dense(loaded).to(device) if cfg.distill > 0 else None
    if cfg.baseline:
        return _run_baseline(cfg, loaded, report, train_blocks, eval_blocks, device, autocast, teacher,
                             ckpt_dir, out, t0, log)
    sp = model_mod.Sparsifier(loaded.model)
    report["relu_zero_shot"] = evaluate(loaded.model, eval_blocks, device, autocast, cfg.batch_size, sp)
    log(f"ReLU substituted, untrained: ppl {report['relu_zero_shot']['ppl']:.3f}, "
        f"sparsity {report['relu_zero_shot']['sparsity']:.1%}")

    if cfg.sweep_lambdas:
        sw = lambda_sweep(loaded, sp, cfg, train_blocks, eval_blocks, device, autocast)
        report["lambda_sweep"] = sw
        for r in sw["rows"]:
            log(f"  sweep final λ {r['final_lambda']:g}: sparsity {r['sparsity']:.1%}, ppl {r['ppl']:.3f}")
        log(f"λ sweep: final λ {sw['chosen']:g} " + ("reaches" if sw["reached"] else "is the largest tried; none reaches")
            + f" the target sparsity {cfg.target_sparsity:.0%}")
        if cfg.sweep_only:
            out.mkdir(parents=True, exist_ok=True)
            with open(out / "sparsify_report.json", "w") as f:
                json.dump(report, f, indent=2)
            return report
        sched = _schedule(cfg, cfg.steps, sw["chosen"])
    log(f"schedule (λ@end step): {sched.describe()}")
    report["schedule"] = [list(s) for s in sched.stages]

    trainer = Trainer(loaded, sp, cfg, sched, train_blocks, device, autocast, teacher, ckpt_dir)
    if cfg.resume and (ckpt_dir / "state.pt").exists():
        trainer.load_checkpoint(ckpt_dir / "state.pt")
        log(f"resumed from {ckpt_dir / 'state.pt'} at step {trainer.step}")
    trainer.run()
    trainer.save_checkpoint()
    report["tokens_trained"] = trainer.tokens_trained
    report["train_wall_s"] = trainer.wall
    report["history"] = trainer.history

    rows = threshold_sweep(loaded, sp, eval_blocks, device, autocast, cfg)
    report["threshold_sweep"] = rows
    t = choose_threshold(rows, cfg.max_ppl_increase) if cfg.threshold == "auto" else float(cfg.threshold)
    sp.set_threshold(t)
    report["threshold"] = t
    report["after_relu"] = next(r for r in rows if r["threshold"] == 0.0)
    report["after"] = evaluate(loaded.model, eval_blocks, device, autocast, cfg.batch_size, sp)
    for r in rows:
        log(f"  t={r['threshold']:<6g} sparsity {r['sparsity']:.1%}  ppl {r['ppl']:.3f}")
    log(f"after (FATReLU t={t:g}): ppl {report['after']['ppl']:.3f}, sparsity {report['after']['sparsity']:.1%}; "
        f"{report['tokens_trained']} tokens in {report['train_wall_s']:.0f}s")

    model_mod.save(loaded, out, t, save_dtype)
    report["wall_s"] = time.time() - t0
    with open(out / "sparsify_report.json", "w") as f:
        json.dump(report, f, indent=2)
    plot(trainer.history, out / "sparsify_plot.png",
         f"{Path(cfg.model).name}: schedule {sched.describe()}")
    return report


def _run_baseline(cfg: Config, loaded, report: Dict, train_blocks, eval_blocks, device, autocast, teacher,
                  ckpt_dir: Path, out: Path, t0: float, log) -> Dict:
    """The same training (data order, steps, LR schedule) with the original activation and λ = 0:
    what the corpus alone does to perplexity, against which the sparse model's cost is stated."""
    sched = sched_mod.Schedule(((0.0, int(cfg.steps)),)) if cfg.steps else _schedule(cfg, None, 0.0)
    report["schedule"] = [list(s) for s in sched.stages]
    trainer = Trainer(loaded, _Dense(), cfg, sched, train_blocks, device, autocast, teacher, ckpt_dir,
                      desc="baseline")
    if cfg.resume and (ckpt_dir / "state.pt").exists():
        trainer.load_checkpoint(ckpt_dir / "state.pt")
        log(f"resumed from {ckpt_dir / 'state.pt'} at step {trainer.step}")
    trainer.run()
    trainer.save_checkpoint()
    report.update(tokens_trained=trainer.tokens_trained, train_wall_s=trainer.wall, history=trainer.history)
    report["after"] = evaluate(loaded.model, eval_blocks, device, autocast, cfg.batch_size)
    log(f"after (baseline, original activation, no L1): ppl {report['after']['ppl']:.3f}; "
        f"{report['tokens_trained']} tokens in {report['train_wall_s']:.0f}s")
    act = loaded.source_config.get("hidden_act", "silu")
    model_mod.save(loaded, out, 0.0, _SAVE_DTYPES[cfg.save_dtype], hidden_act=act)
    report["wall_s"] = time.time() - t0
    with open(out / "sparsify_report.json", "w") as f:
        json.dump(report, f, indent=2)
    return report
