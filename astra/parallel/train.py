"""Calibration (training-free), fine-tuning and evaluation of ASTRA, in simulation (paper §3).

- `calibrate_`: K-means codebooks from the model's own full-precision activations and NAQ noise
  fitted to the residuals; no gradient step. The paper always fine-tunes; this mode is ours.
- `finetune`: task loss + commitment (Eq. 2, summed over blocks) + NAQ + distributed class
  tokens, optionally distilled from the frozen full-precision model; resumable checkpoints.
- `evaluate`: one metric for the full-precision model or ASTRA on N simulated devices.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import multiprocessing as mp
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from astra.net.packets import PacketChannel, input_seed
from astra.parallel.placement import PlacementConfig
from astra.parallel.simulate import AstraModel
from astra.storage import load_tensors, save_tensors
from astra.tasks import SentenceEmbedding, Task
from astra.vq.codebook import kmeans_plus_plus_rounds

CHECKPOINT_KIND = "astra-finetune-checkpoint/1"


@torch.no_grad()
def subsample(recorded: list[list[Tensor]], max_samples: int, seed: int) -> list[list[Tensor]]:
    """At most `max_samples` random rows of every recorded (N, width) tensor (per block, per
    codebook), drawn from one seeded generator in block order: the calibration data."""
    gen = torch.Generator().manual_seed(seed)
    return [
        [s[torch.randperm(s.shape[0], generator=gen)[:max_samples]] if s.shape[0] > max_samples
         else s for s in parts]
        for parts in recorded
    ]  # fmt: skip


def calibrate_(
    astra: AstraModel,
    task: Task,
    *,
    num_sequences: int = 64,
    max_samples: int = 16384,
    kmeans_iters: int = 20,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Fit every codebook by K-means on its block's full-precision inputs, then the NAQ noise.

    Returns per-block relative quantization error ||x - x_hat||^2 / ||x||^2 (one per codebook)
    and the seconds of each stage: `activations` and `kmeans` (wall clock), and within K-means,
    `seeding`, `lloyd` and `naq` summed over the codebooks (one worker process per core).
    """
    astra.eval()
    t0 = time.perf_counter()
    batches = list(task.batches("train", num_sequences))
    recorded = astra.record_quant_inputs(
        lambda: [
            astra.forward_hidden(task.embed(astra.model, b), None, task.attention_mask(b))
            for b in tqdm(batches, desc="activations", disable=not progress)
        ]
    )
    recorded = subsample(recorded, max_samples, seed)
    t1 = time.perf_counter()
    jobs = [
        (codebook, samples)
        for quantizer, parts in zip(astra.quantizers, recorded)
        for codebook, samples in zip(quantizer.codebooks, parts)
    ]
    noises = [noise for quantizer in astra.quantizers for noise in quantizer.noises]
    bar = tqdm(total=len(jobs), desc="k-means", disable=not progress)
    workers = torch.get_num_threads()
    fitted: list = [None] * len(jobs)
    if workers > 1 and "fork" in mp.get_all_start_methods():
        # A forked process per core, each with one intra-op thread (DataLoader's workers do the
        # same): the searches are many small ops (1 MiB blocks), which OpenMP's threads made
        # 20-40x slower on a busy 2-core machine, spinning while they wait for each other, and
        # two Python threads 1.6x slower each (the GIL between ops). calibration.md.
        # The forked workers inherit `jobs`; only indices and the results cross the pipes.
        with mp.get_context("fork").Pool(
            workers, initializer=_init_kmeans_worker, initargs=(jobs, kmeans_iters, seed)
        ) as pool:
            for i, result in pool.imap_unordered(_fit_kmeans_job, range(len(jobs))):
                fitted[i] = result
                bar.update()
    else:
        _init_kmeans_worker(jobs, kmeans_iters, seed, threads=None)
        for i in range(len(jobs)):
            fitted[i] = _fit_kmeans_job(i)[1]
            bar.update()
        _KMEANS_JOBS.clear()
    bar.close()
    errors = []
    naq_s = 0.0
    for (codebook, samples), noise, (state, codes, _) in zip(jobs, noises, fitted):
        t = time.perf_counter()
        for name, value in state.items():
            getattr(codebook, name).copy_(value)
        # kmeans_init_'s codes are the samples' nearest codes: encode(samples), already made
        residual = samples - codebook.decode(codes.long())
        noise.reset_()
        noise.fit_(residual)
        naq_s += time.perf_counter() - t
        errors.append(float(residual.square().sum() / samples.square().sum()))
    flat_errors = iter(errors)
    seconds = {"activations": t1 - t0, "kmeans": time.perf_counter() - t1}
    for stage in ("seeding", "lloyd"):
        seconds[stage] = sum(times[stage] for _, _, times in fitted)
    seconds["naq"] = naq_s
    num_inputs = sum(len(next(iter(b.values()))) for b in batches)
    return {
        "relative_error_per_block": [[next(flat_errors) for _ in parts] for parts in recorded],
        "num_inputs": num_inputs,
        "seconds": seconds,
    }


_KMEANS_JOBS: dict = {}  # calibrate_'s work, for its (forked) workers: set by the initializer


def _init_kmeans_worker(jobs: list, kmeans_iters: int, seed: int, threads: int | None = 1):
    _KMEANS_JOBS.update(jobs=jobs, kmeans_iters=kmeans_iters, seed=seed)
    if threads is not None:
        torch.set_num_threads(threads)


@torch.no_grad()
def _fit_kmeans_job(i: int) -> tuple[int, tuple[dict, torch.Tensor, dict]]:
    """K-means for codebook i of _KMEANS_JOBS: (i, (its buffers, the samples' codes, seconds))."""
    codebook, samples = _KMEANS_JOBS["jobs"][i]
    seed = _KMEANS_JOBS["seed"]
    times = {}
    t = time.perf_counter()
    seeds = None
    if samples.shape[0] >= codebook.config.codebook_size:  # else kmeans_init_ warns
        x = codebook._to_groups(samples).contiguous()  # (G, N, Dg)
        gen = torch.Generator().manual_seed(seed)  # the draws kmeans_init_ would make
        seeds = kmeans_plus_plus_rounds(x, codebook.config.codebook_size, gen)
    times["seeding"] = time.perf_counter() - t
    t = time.perf_counter()
    codes = codebook.kmeans_init_(
        samples, num_iters=_KMEANS_JOBS["kmeans_iters"], seed=seed, seeds=seeds
    )
    times["lloyd"] = time.perf_counter() - t
    small = torch.int16 if codebook.config.codebook_size <= 2**15 else torch.int32
    return i, (dict(codebook.state_dict()), codes.to(small), times)


@torch.no_grad()
def evaluate(
    astra: AstraModel,
    task: Task,
    placement: PlacementConfig | None,
    *,
    split: str = "test",
    limit: int | None = None,
    reference: AstraModel | None = None,
    progress: bool = True,
    loss: PacketChannel | None = None,
) -> float:
    """The task metric with ASTRA on `placement` (None = the full-precision model); `loss`:
    the packets of codes a lossy link drops (astra.net.packets).

    `reference`: the model whose full-precision outputs the embedding task compares with
    (default `astra` itself; pass the original model when `astra` carries fine-tuned weights).
    """
    astra.eval()
    reference = astra if reference is None else reference.eval()
    total, count = 0.0, 0
    needs_reference = isinstance(task, SentenceEmbedding)
    desc = "full precision" if placement is None else f"astra x{placement.num_devices}"
    for batch in tqdm(task.batches(split, limit), desc=desc, disable=not progress):
        x = task.embed(astra.model, batch)
        mask = task.attention_mask(batch)
        expected = None
        if needs_reference:
            x_ref = task.embed(reference.model, batch)
            expected = task.outputs(reference.model, reference.forward_hidden(x_ref, None, mask))
        channels = None
        if loss is not None and placement is not None:  # each sequence meets its own losses
            rows = batch["input_ids"] if "input_ids" in batch else batch["pixels"]
            channels = [loss.reseeded(input_seed(row)) for row in rows]
        outputs = task.outputs(astra.model, astra.forward_hidden(x, placement, mask, channels))
        s, n = task.score(outputs, expected, batch)
        total, count = total + s, count + n
    return task.finish(total, count)


def finetune(
    astra: AstraModel,
    task: Task,
    *,
    num_devices: int,
    steps: int,
    lr: float = 1e-5,
    placement_kind: str = "contiguous",
    distill_weight: float = 0.0,
    train_limit: int | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 50,
    warmup_steps: int | None = None,
    seed: int = 0,
    progress: bool = True,
    on_checkpoint=None,
) -> list[dict]:
    """Fine-tune the model and codebooks under ASTRA (paper Eq. 2 + NAQ + DCT).

    Loss = task loss (or, for the embedding task, 1 - cos to the teacher)
         + distill_weight * KL(teacher || student) on the outputs (0 = off)
         + sum over blocks of beta * ||x - sg(x_hat)||^2.
    Codebooks follow their inputs by EMA (no codebook loss term, as in the paper). With
    `checkpoint`, training state is saved every `checkpoint_every` steps and resumed from it.
    `on_checkpoint(step)` lets the caller also write an artefact. The learning rate warms up
    linearly over `warmup_steps` (default a tenth of `steps`), then follows a cosine to 0.
    """
    torch.manual_seed(seed)
    probe = getattr(task, "probe", None)
    teacher = teacher_probe = None
    if distill_weight > 0 or isinstance(task, SentenceEmbedding):
        # deep-copied before any checkpoint is loaded: the teacher is the model as given
        teacher = copy.deepcopy(astra).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        # the head is trained with the student; the teacher keeps a frozen copy of it
        teacher_probe = copy.deepcopy(probe).eval() if probe is not None else None
    params = [p for p in astra.model.parameters() if p.requires_grad]
    if probe is not None:
        params += list(probe.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    history: list[dict] = []
    start = 0
    ckpt_path = Path(checkpoint) if checkpoint else None
    if ckpt_path is not None and ckpt_path.is_file():
        state = load_tensors(ckpt_path, kind=CHECKPOINT_KIND)
        try:
            astra.load_state_dict(state["astra"])
            opt.load_state_dict(state["optimizer"])
            if probe is not None and state.get("probe") is not None:
                probe.load_state_dict(state["probe"])
        except (RuntimeError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(
                f"checkpoint {ckpt_path} does not fit this model and ASTRA config ({first}); "
                "delete it or pass another --checkpoint"
            ) from None
        start, history = state["step"], state["history"]
        if "rng" in state:  # NAQ noise and dead-code restarts draw from the global generator
            torch.set_rng_state(state["rng"])
        if start >= steps:
            astra.eval()
            return history
    # linear warm-up, then cosine to 0: without warm-up Adam's first steps are full-size sign
    # updates, and one of them at lr 3e-5 wrecked DINOv2-S (task loss 0.45 -> 9.3 in one step)
    warmup = min(warmup_steps, steps // 2) if warmup_steps is not None else steps // 10

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))

    # lazily, epoch after epoch: a list of every batch would hold all 50k Fashion-MNIST images
    data = itertools.chain.from_iterable(
        task.batches("train", train_limit) for _ in itertools.count()
    )
    for _ in range(start):  # resume at the same place in the data
        next(data)
    astra.train()
    bar = tqdm(
        range(start, steps), desc="finetune", disable=not progress, initial=start, total=steps
    )
    t0 = time.perf_counter()
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr * schedule(step)
        batch = next(data)
        kind = placement_kind if placement_kind != "mixed" else ("random", "contiguous")[step % 2]
        placement = PlacementConfig(num_devices, kind=kind, seed=seed * 100003 + step)
        x = task.embed(astra.model, batch)
        mask = task.attention_mask(batch)
        outputs = task.outputs(astra.model, astra.forward_hidden(x, placement, mask))
        reference = None
        if teacher is not None:
            with torch.no_grad():
                x_t = task.embed(teacher.model, batch)
                with _swapped_probe(task, teacher_probe):
                    reference = task.outputs(teacher.model, teacher.forward_hidden(x_t, None, mask))
        if isinstance(task, SentenceEmbedding):
            task_loss = task.loss(outputs, batch, reference)
        else:
            task_loss = task.loss(outputs, batch)
        loss = task_loss + astra.commitment_loss()
        if distill_weight > 0 and not isinstance(task, SentenceEmbedding):
            kl = F.kl_div(
                F.log_softmax(outputs, -1),
                F.log_softmax(reference, -1),
                log_target=True,
                reduction="batchmean",
            )
            if outputs.dim() == 3:
                kl = kl / outputs.shape[1]  # batchmean over (B, T): per token
            loss = loss + distill_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        record = {
            "step": step + 1,
            "loss": float(loss.detach()),
            "task_loss": float(task_loss.detach()),
            "commit": float(astra.commitment_loss().detach()),
            "elapsed_s": time.perf_counter() - t0,
        }
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        if ckpt_path is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
            # atomic (astra.storage): Ctrl-C mid-write leaves the previous checkpoint to resume
            save_tensors(
                ckpt_path,
                {
                    "astra": astra.state_dict(),
                    "optimizer": opt.state_dict(),
                    "probe": probe.state_dict() if probe is not None else None,
                    "step": step + 1,
                    "history": history,
                    "rng": torch.get_rng_state(),
                },
                kind=CHECKPOINT_KIND,
            )
            if on_checkpoint is not None:
                on_checkpoint(step + 1)
    astra.eval()
    return history


@contextlib.contextmanager
def _swapped_probe(task: Task, probe):
    """Let `task.outputs` use `probe` (the teacher's frozen head) for the duration."""
    if probe is None:
        yield
        return
    own = task.probe
    task.probe = probe
    try:
        yield
    finally:
        task.probe = own
