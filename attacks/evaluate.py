"""The robustness sweep as a Lightning test loop with torchmetrics.

One `trainer.test` call per job (the clean pass, then one attack at one eps, then the sanity
attack). The test set is cut into fixed batches that are dealt to processes round-robin, and
each batch's attack is seeded from (seed, attack, eps, model, batch number), so a run on any
number of processes attacks exactly the same inputs with exactly the same randomness as a
single process, and the sum-reduced counts give the single-process numbers.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from torchmetrics import Metric

from attacks import memory
from attacks.catalog import ATTACKS, AttackOptions
from attacks.config import EvalConfig
from attacks.registry import build_attack, perturbation_norm, transfer_differs
from attacks.stats import auroc, auroc_interval, encode_mask, mean_interval, wilson_interval
from attacks.threats import UNBOUNDED_EPS, UNBOUNDED_STEPS, plan
from ensemble.base import FusedEnsemble, MeanLogits, summarize
from orbit.errors import UserError

# Float slack when checking that an attack stayed inside its budget and the pixel box.
BUDGET_SLACK = 1e-5


@dataclass
class EvalModel:
    """A model under evaluation: a plain classifier or a FusedEnsemble, with report metadata."""

    name: str
    module: nn.Module
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_ensemble(self) -> bool:
        return isinstance(self.module, FusedEnsemble)


@dataclass(frozen=True)
class Job:
    """One pass of the test loop: the clean pass, or one attack at one eps under its threats."""

    role: str  # "clean" | "sweep" | "sanity"
    attack: str | None
    eps: float
    threats: tuple[str, ...]
    options: AttackOptions
    batch_size: int = 0  # set by the memory bound

    @property
    def label(self) -> str:
        if self.attack is None:
            return "clean"
        return f"{self.attack} eps={self.eps:g} ({', '.join(self.threats)})"


def jobs_for(config: EvalConfig) -> list[Job]:
    """The jobs of a sweep, in order: clean, each attack at each eps > 0, then the sanity attack."""
    cells = plan(list(config.attacks), list(config.threats))
    jobs = [Job("clean", None, 0.0, ("clean",), config.options)]
    by_attack: dict[str, list[str]] = {}
    for c in cells:
        by_attack.setdefault(c.attack, []).append(c.threat)
    for attack, threats in by_attack.items():
        for eps in config.eps_for(attack):
            if eps > 0:
                jobs.append(Job("sweep", attack, eps, tuple(threats), config.options))
    if config.sanity_attack:
        opts = AttackOptions(steps=UNBOUNDED_STEPS, step_size=0.25, restarts=1)
        jobs.append(Job("sanity", "pgd", UNBOUNDED_EPS, ("white-box",), opts))
    return jobs


def derive_seed(*parts: object) -> int:
    """A seed from named parts, the same in every process (unlike Python's salted hash)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


class ShardedBatches(Sampler[int]):
    """Batch numbers for one process: fixed batches of `batch_size` consecutive inputs, batch b
    to process b % world.

    No input is padded or repeated, and a batch's contents never depend on the number of
    processes (unlike DistributedSampler, which pads and interleaves). A process left without
    a batch gets the empty batch -1, because Lightning refuses an empty loader.
    """

    def __init__(self, n: int, batch_size: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world

    def batch_ids(self) -> list[int]:
        return list(range(self.rank, math.ceil(self.n / self.batch_size), self.world)) or [-1]

    def __iter__(self) -> Iterator[int]:
        return iter(self.batch_ids())

    def __len__(self) -> int:
        return len(self.batch_ids())


class Batches(Dataset):
    """Item b is the whole batch b: (x, y, input indices); item -1 is an empty batch."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> None:
        self.x, self.y, self.batch_size = x, y, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.y) / self.batch_size)

    def __getitem__(self, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if b < 0:
            return self.x[:0], self.y[:0], torch.zeros(0, dtype=torch.long)
        idx = torch.arange(b * self.batch_size, min(len(self.y), (b + 1) * self.batch_size))
        return self.x[idx], self.y[idx], idx


class CellMetric(Metric):
    """Counts for one (model, threat) cell of a job, summed over processes.

    For ensembles it also keeps per-input mutual information on clean and adversarial inputs
    (concatenated over processes) for the AUROC of telling them apart.
    """

    full_state_update = False

    def __init__(self, ensemble: bool) -> None:
        super().__init__()
        self.ensemble = ensemble
        for name in ("correct", "total", "agree_votes", "votes", "violations"):
            self.add_state(name, torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        # Which inputs (by index) stayed correct: for paired tests between attacks.
        self.add_state("ids", [], dist_reduce_fx="cat")
        self.add_state("oks", [], dist_reduce_fx="cat")
        if ensemble:
            for name in ("mi_clean", "mi_adv", "clean_ok", "adv_ok", "agree"):
                self.add_state(name, [], dist_reduce_fx="cat")

    def update(
        self,
        ids: torch.Tensor,
        y: torch.Tensor,
        clean: Outputs,
        adv: Outputs,
        violations: int,
    ) -> None:
        # Robust: right on the clean input and on the attacked one (a perturbation that repairs a
        # mistake does not count), as RobustBench and AutoAttack count robust accuracy.
        ok = (adv.label == y) & (clean.label == y)
        self.correct += ok.sum()
        self.total += y.numel()
        self.violations += violations
        self.ids.append(ids.float())  # float: torchmetrics pads empty cat states as float
        self.oks.append(ok.float())
        if self.ensemble:
            self.agree_votes += adv.agree_votes.sum()
            self.votes += adv.members * y.numel()
            self.agree.append(adv.agree_votes.double() / adv.members)
            self.mi_clean.append(clean.mutual_info.float())
            self.mi_adv.append(adv.mutual_info.float())
            self.clean_ok.append((clean.label == y).float())
            self.adv_ok.append(ok.float())

    def compute(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "n": int(self.total),
            "correct": int(self.correct),
            "budget_violations": int(self.violations),
            "agreement": None,
            "agreement_ci95": None,
            "auroc_mi": None,
            "auroc_mi_ci95": None,
            "auroc_mi_n": None,
            "auroc_mi_successful": None,
            "auroc_mi_successful_ci95": None,
            "auroc_mi_successful_n": None,
            "correct_mask": encode_mask(_cat(self.ids), _cat(self.oks)),
        }
        if self.ensemble and int(self.votes) > 0:
            out["agreement"] = int(self.agree_votes) / int(self.votes)
            out["agreement_ci95"] = mean_interval(_cat(self.agree))
            mi_c, mi_a = _cat(self.mi_clean), _cat(self.mi_adv)
            c_ok, a_ok = _cat(self.clean_ok) > 0.5, _cat(self.adv_ok) > 0.5
            for key, neg, pos in (
                ("auroc_mi", mi_c, mi_a),
                ("auroc_mi_successful", mi_c[c_ok], mi_a[c_ok & ~a_ok]),
            ):
                out[key] = auroc(neg, pos)
                out[f"{key}_n"] = [int(neg.size), int(pos.size)]  # clean, adversarial
                if out[key] is not None:
                    out[f"{key}_ci95"] = list(auroc_interval(out[key], neg.size, pos.size))
        return out


def _cat(state: list[torch.Tensor] | torch.Tensor) -> np.ndarray:
    if isinstance(state, list):
        state = torch.cat(state) if state else torch.zeros(0)
    return state.detach().cpu().numpy()


@dataclass
class Outputs:
    """What the evaluation reads from a model on a batch."""

    label: torch.Tensor
    agree_votes: torch.Tensor | None = None  # members voting with the ensemble, per input
    mutual_info: torch.Tensor | None = None
    members: int = 0


def _no_outputs() -> Outputs:
    """Outputs for an empty batch (every tensor of length 0)."""
    empty = torch.zeros(0, dtype=torch.long)
    return Outputs(empty, empty, torch.zeros(0), 1)


@torch.no_grad()
def model_outputs(module: nn.Module, x: torch.Tensor) -> Outputs:
    if isinstance(module, FusedEnsemble):
        logits = module.member_logits(x)
        pred = summarize(logits)
        votes = (logits.argmax(-1) == pred.label.unsqueeze(0)).sum(0)
        return Outputs(pred.label, votes, pred.mutual_info, int(logits.shape[0]))
    return Outputs(module(x).argmax(-1))


class SweepModule(pl.LightningModule):
    """Holds the models; `test_step` attacks a batch as the current job says and counts."""

    def __init__(
        self,
        models: list[EvalModel],
        x: torch.Tensor,
        y: torch.Tensor,
        num_classes: int,
        seed: int,
        on_batch: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        self.names = [m.name for m in models]
        self.ensembles = {m.name for m in models if m.is_ensemble}
        self.nets = nn.ModuleDict({m.name: m.module for m in models})
        self.base = self.names[0]
        self.x, self.y = x, y
        self.num_classes = num_classes
        self.seed = seed
        self.on_batch = on_batch
        self.job: Job | None = None
        self.cells = nn.ModuleDict()
        self.results: dict[tuple[str, str], dict[str, Any]] = {}

    def start(self, job: Job) -> None:
        self.job = job
        self.results = {}
        self.cells = nn.ModuleDict(
            {
                f"{name}|{threat}": CellMetric(name in self.ensembles)
                for threat in job.threats
                for name in self.names
            }
        )

    def test_dataloader(self) -> DataLoader:
        assert self.job is not None
        sampler = ShardedBatches(
            len(self.y), self.job.batch_size, self.trainer.global_rank, self.trainer.world_size
        )
        batches = Batches(self.x, self.y, self.job.batch_size)
        return DataLoader(batches, batch_size=None, sampler=sampler)  # items are whole batches

    def craft(
        self, name: str, x: torch.Tensor, y: torch.Tensor, batch: int, transfer: bool = False
    ) -> tuple:
        """Adversarial inputs crafted on model `name` (its transfer version when `transfer`),
        with out-of-budget ones reset to x.

        White-box on an ensemble: the attack runs through the fused log-mean-probability and,
        separately, through the mean member logit (MeanLogits); each input keeps the first that
        fools the ensemble (the adaptive attacker tries both losses)."""
        job = self.job
        assert job is not None and job.attack is not None
        model = self.nets[name]
        adv = self._run_attack(model, name, x, y, batch, transfer)
        if not transfer and name in self.ensembles and ATTACKS[job.attack].gradient:
            resisted = model_outputs(model, adv).label == y
            if bool(resisted.any()):
                other = self._run_attack(MeanLogits(model), f"{name}/mean-logits", x, y, batch)
                fooled = model_outputs(model, other).label != y
                take = (resisted & fooled).view(-1, *[1] * (x.dim() - 1))
                adv = torch.where(take, other, adv)
        info = ATTACKS[job.attack]
        size = perturbation_norm(adv - x, info.norm)
        outside = (size > job.eps * (1 + BUDGET_SLACK) + BUDGET_SLACK) | (
            (adv < -BUDGET_SLACK) | (adv > 1 + BUDGET_SLACK)
        ).flatten(1).any(dim=1)
        adv = torch.where(outside.view(-1, *[1] * (x.dim() - 1)), x, adv)
        # An unbounded attack (cw) beyond eps simply failed at this budget; a bounded attack
        # leaving its budget is a bug that the sanity checks report.
        violations = int(outside.sum()) if info.bounded else 0
        return adv, violations

    def _run_attack(
        self,
        model: nn.Module,
        name: str,
        x: torch.Tensor,
        y: torch.Tensor,
        batch: int,
        transfer: bool = False,
    ) -> torch.Tensor:
        """The job's attack on `model`, seeded by (seed, job, name, batch) in every process."""
        job = self.job
        assert job is not None and job.attack is not None
        seed = derive_seed(self.seed, job.role, job.attack, f"{job.eps:.10g}", name, batch)
        torch.manual_seed(seed)
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(seed)
        attack = build_attack(
            job.attack, model, job.eps, job.options, seed, self.num_classes, transfer=transfer
        )
        with torch.enable_grad():
            return attack(x, y).detach()

    def test_step(self, batch: tuple, batch_idx: int) -> None:
        x, y, index = batch
        job = self.job
        assert job is not None
        if len(y) == 0:
            # A process left without a batch still adds (empty) entries to every cell, so that
            # its list states take part in the gather like every other process's.
            for metric in self.cells.values():
                metric.update(index, y, _no_outputs(), _no_outputs(), 0)
            return
        number = int(index[0]) // job.batch_size  # the batch's global number
        clean = {name: model_outputs(self.nets[name], x) for name in self.names}
        if job.attack is None:
            for name in self.names:
                self.cells[f"{name}|clean"].update(index, y, clean[name], clean[name], 0)
        else:
            crafted: dict[tuple[str, bool], tuple] = {}
            own_transfer = transfer_differs(job.attack, job.options)

            def on(name: str, transfer: bool) -> tuple:
                key = (name, transfer and own_transfer)
                if key not in crafted:
                    crafted[key] = self.craft(name, x, y, number, transfer=key[1])
                return crafted[key]

            for threat in job.threats:
                for name in self.names:
                    transfer = threat == "transfer"
                    adv, violations = on(self.base if transfer else name, transfer)
                    outs = model_outputs(self.nets[name], adv)
                    self.cells[f"{name}|{threat}"].update(index, y, clean[name], outs, violations)
        if self.on_batch is not None:
            self.on_batch()

    def on_test_epoch_end(self) -> None:
        # Every process computes every cell in the same order: compute() is the collective.
        self.results = {
            tuple(key.split("|")): metric.compute() for key, metric in self.cells.items()
        }


def _quiet_lightning() -> None:
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in (
        ".*does not have many workers.*",
        ".*LeafSpec.*is deprecated.*",
        ".*compute.*was called before.*update.*",
        ".*self.log.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)


def is_launching_process() -> bool:
    """True in the process the user started (not in DDP workers Lightning launched)."""
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


@dataclass
class JobResult:
    job: Job
    cells: dict[tuple[str, str], dict[str, Any]]
    seconds: float


def result_rows(result: JobResult) -> list[dict[str, Any]]:
    """Flat report rows for one job: counts, accuracy and its Wilson 95% interval."""
    job = result.job
    rows = []
    for (model, threat), c in result.cells.items():
        n, k = c["n"], c["correct"]
        lo, hi = wilson_interval(k, n)
        rows.append(
            {
                "role": job.role,
                "model": model,
                "attack": job.attack,
                "threat": threat,
                "eps": job.eps,
                "norm": ATTACKS[job.attack].norm if job.attack else None,
                "n": n,
                "correct": k,
                "accuracy": k / n if n else None,
                "ci95": [lo, hi],
                "agreement": c["agreement"],
                "agreement_ci95": c["agreement_ci95"],
                **{
                    k: None if job.attack is None else c[k]
                    for k in (
                        "auroc_mi",
                        "auroc_mi_ci95",
                        "auroc_mi_n",
                        "auroc_mi_successful",
                        "auroc_mi_successful_ci95",
                        "auroc_mi_successful_n",
                    )
                },  # fmt: skip
                "budget_violations": c["budget_violations"],
                "correct_mask": c["correct_mask"],
                "batch_size": job.batch_size,
                "seconds": round(result.seconds, 3),
            }
        )
    return rows


class Sweep:
    """Runs the jobs of a sweep over the models on (x, y), one Lightning test pass per job."""

    def __init__(
        self,
        models: list[EvalModel],
        x: torch.Tensor,
        y: torch.Tensor,
        num_classes: int,
        config: EvalConfig,
    ) -> None:
        if not models:
            raise UserError("nothing to evaluate: no models given")
        self.models, self.x, self.y = models, x, y
        self.num_classes, self.config = num_classes, config
        self.jobs = self._size_jobs(jobs_for(config))
        self._trainer = self.trainer()  # now: flags Lightning refuses fail before any file

    def _size_jobs(self, jobs: list[Job]) -> list[Job]:
        sample = self.x[:1]
        estimates = {m.name: memory.estimate(m.module, sample) for m in self.models}
        input_bytes = sample.numel() * sample.element_size()
        sized = []
        for job in jobs:
            attacked = (
                {self.models[0].name: estimates[self.models[0].name]}
                if job.threats == ("transfer",)
                else estimates
            )
            b = memory.fit_batch(
                attacked, job.attack, self.config.batch_size, self.config.max_memory_mb,
                input_bytes,
            )  # fmt: skip
            sized.append(Job(job.role, job.attack, job.eps, job.threats, job.options, b))
        return sized

    def trainer(self) -> pl.Trainer:
        """Lightning's Trainer for the test loop; flags it refuses are user errors."""
        from pytorch_lightning.utilities.exceptions import MisconfigurationException

        _quiet_lightning()
        try:
            return self._make_trainer()
        except (ValueError, MisconfigurationException, ImportError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            cfg = self.config
            raise UserError(
                f"Lightning refuses --accelerator {cfg.accelerator} --strategy {cfg.strategy}"
                f" --devices {cfg.devices} --num-nodes {cfg.num_nodes}: {first}"
            ) from None

    def _make_trainer(self) -> pl.Trainer:
        return pl.Trainer(
            accelerator=self.config.accelerator,
            devices=self.config.devices,
            strategy=self.config.strategy,
            num_nodes=self.config.num_nodes,
            precision="32-true",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            inference_mode=False,  # attacks need gradients inside test_step
            use_distributed_sampler=False,  # ShardedBatches shards without padding
        )

    def run(
        self,
        on_job_done: Callable[[JobResult], None] | None = None,
        on_batch: Callable[[], None] | None = None,
        on_job_start: Callable[[int, Job], None] | None = None,
    ) -> list[JobResult]:
        """Run every job; `on_job_done` sees each result as soon as all processes have it."""
        trainer = self._trainer
        module = SweepModule(
            self.models, self.x, self.y, self.num_classes, self.config.seed, on_batch
        )
        results = []
        for number, job in enumerate(self.jobs):
            if on_job_start is not None:
                on_job_start(number, job)
            module.start(job)
            started = time.perf_counter()
            trainer.test(module, verbose=False)
            result = JobResult(job, dict(module.results), time.perf_counter() - started)
            results.append(result)
            if on_job_done is not None:
                on_job_done(result)
        self.is_global_zero = trainer.is_global_zero
        self.world_size = trainer.world_size
        for m in self.models:  # Lightning may have moved them to the accelerator / train mode
            m.module.cpu().eval()
        return results

    def batches_on_rank0(self, world_size: int) -> int:
        """How many batches the progress bar of process 0 will see over the whole sweep."""
        return sum(len(ShardedBatches(len(self.y), j.batch_size, 0, world_size)) for j in self.jobs)


@torch.no_grad()
def clean_accuracy(module: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> int:
    """Correct predictions on (x, y) by a plain loop, independent of the Lightning sweep."""
    module.eval()
    correct = 0
    for s in range(0, len(y), batch):
        correct += int((model_outputs(module, x[s : s + batch]).label == y[s : s + batch]).sum())
    return correct
