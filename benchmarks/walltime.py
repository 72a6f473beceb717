"""Wall time per image at equal NFE: dpmlab vs diffusers on the same network, CPU options, and the
cost of a calibration (issue 17, item 5).

Sections (``--sections``, comma-separated; each prints markdown tables and updates its key in
``docs/benchmarks/walltime.json``):

* ``t2i``: the shipped text-to-image model (``dpmlab.load("mnist_t2i")``: diffusers
  ``UNet2DConditionModel``) with classifier-free guidance. diffusers' ``StableDiffusionPipeline``
  with its own scheduler vs ``dpmlab.sample`` (CFG as two UNet calls, as ``TextToImage.guided``
  does today), ``dpmlab.sample`` with a one-call CFG (cond and uncond stacked, as diffusers does; a
  wrapper defined here) and the pipeline with ``DPMLabScheduler``. Same UNet, same grid (the
  pipeline's timesteps), same start latents, same guidance, same batch; latents out (no VAE decode
  in any); prompt embeddings computed once outside the timed region in every variant. UNet calls
  and rows are counted by a forward pre-hook on every timed run.
* ``mnist``: the shipped MNIST pixel model (dpmlab's own UNet, v-prediction): ``dpmlab.sample`` vs a
  plain diffusers scheduler loop (``set_timesteps`` / ``scale_model_input`` / ``step``) around the
  same network, same grid, same start noise; plus the sampler-only overhead from
  ``dpmlab.bench.harness._overhead_ms`` (reused, trivial model).
* ``split``: the time outside the network per network call in every variant above (wall minus the
  time inside the network's forward, both from the same run): what each library adds.
* ``parts``: the network's time per call (best of 10) and the sampler's time per step with a trivial
  model (``benchmarks/overhead.py``'s ``time_dpmlab`` / ``time_diffusers``, best of 20) at both models'
  shapes, and the per-NFE ratio they predict — robust to a loaded machine.
* ``trainable``: a network whose parameters still require grad (fresh from training): ``dpmlab.sample``
  as today vs under ``torch.no_grad``.
* ``options``: ``torch.no_grad`` / ``torch.inference_mode`` / nothing around ``dpmlab.sample``,
  channels-last weights, ``torch.compile`` (inductor; needs a C++ compiler), on both networks;
  outputs compared with the plain call.
* ``calibrate``: wall and CPU time of ``python -m dpmlab calibrate {ems,dc,s3,grid}`` on MNIST at
  NFE 8 at reduced sizes, with a linear fit in the size to extrapolate to the CLI defaults.

Timing protocol: one torch thread, variants interleaved (A B C A B C ..., the order rotated each
round), one warm-up round, the median of ``--reps`` rounds; ``os.getloadavg()`` recorded with each
table (the machine is shared: ratios are more reliable than absolute times).

    nice .venv/bin/python benchmarks/walltime.py --sections t2i,mnist,split,parts,trainable,options,calibrate
    .venv/bin/python benchmarks/walltime.py --render     # the doc's tables from docs/benchmarks/walltime.json
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import dpmlab
from dpmlab._utils import atomic_write
from dpmlab.bench.harness import _final_t, _overhead_ms, _steps_for, peer_scheduler
from dpmlab.interop.diffusers import DPMLabScheduler, scheduler_grid
from dpmlab.solvers import get

torch.set_num_threads(1)
warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]
JSON = ROOT / "docs" / "benchmarks" / "walltime.json"
PROMPT, NEGATIVE, GUIDANCE = "a bold seven", "", 5.0
# (label, diffusers scheduler class and options, dpmlab solver name and options of the same algorithm)
PAIRS: list[tuple[str, str, dict[str, Any], str, dict[str, Any]]] = [
    (
        "DDIM",
        "DDIMScheduler",
        {"clip_sample": False, "set_alpha_to_one": True, "timestep_spacing": "leading"},
        "ddim",
        {},
    ),
    ("DPM-Solver++(2M)", "DPMSolverMultistepScheduler", {"solver_order": 2}, "dpm_solver_pp", {"order": 2}),
    (
        "UniPC-bh2",
        "UniPCMultistepScheduler",
        {"solver_order": 2, "solver_type": "bh2"},
        "unipc",
        {"variant": "bh2"},
    ),
]


# --- measurement helpers --------------------------------------------------------------------------
class CallCounter:
    """Counts forward calls and input rows of a module (a forward pre-hook), to check equal NFE."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = self.rows = 0
        self.seconds, self._t0 = 0.0, 0.0  # time spent inside the module's forward
        self._h = module.register_forward_pre_hook(self._hook)
        self._h2 = module.register_forward_hook(self._done)

    def _hook(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        self.calls += 1
        self.rows += int(args[0].shape[0])
        self._t0 = time.perf_counter()

    def _done(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self.seconds += time.perf_counter() - self._t0

    def reset(self) -> None:
        self.calls = self.rows = 0
        self.seconds = 0.0

    def remove(self) -> None:
        self._h.remove()
        self._h2.remove()


def interleaved(fns: dict[str, Callable[[], Any]], reps: int) -> dict[str, dict[str, float]]:
    """Median / min / max seconds of each callable over ``reps`` rounds after one warm-up round; each
    round runs every callable once, the order rotated by one per round."""
    names = list(fns)
    for k in names:
        fns[k]()
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(reps):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return {k: {"median": statistics.median(v), "min": min(v), "max": max(v)} for k, v in times.items()}


def load_str() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


def table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def max_diff(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def save(path: Path, section: str, payload: dict[str, Any]) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    data[section] = payload
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1) + "\n")


# --- t2i ------------------------------------------------------------------------------------------
class OneCallCFG:
    """Classifier-free guidance with cond and uncond stacked in one network call of ``2B`` rows (what
    diffusers' pipelines do); ``TextToImage.guided`` makes two calls of ``B`` rows. Same x0."""

    def __init__(self, t2i: Any, prompt: str, negative: str, scale: float) -> None:
        self.t2i, self.prompt, self.negative, self.scale = t2i, prompt, negative, scale
        self.schedule, self.data_shape = t2i.schedule, t2i.data_shape

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        b = x.shape[0]
        states = torch.cat([self.t2i.encode_prompt(self.negative, b), self.t2i.encode_prompt(self.prompt, b)])
        tt = t.expand(b) if t.ndim == 0 else t
        x0_u, x0_c = self.t2i(torch.cat([x, x]), torch.cat([tt, tt]), encoder_hidden_states=states).chunk(2)
        return x0_u + self.scale * (x0_c - x0_u)


def cached_dtype(unet: torch.nn.Module) -> None:
    """Make ``unet.dtype`` a constant. diffusers' ``ModelMixin.dtype`` walks every submodule on each
    access (~4 ms for the mnist_t2i UNet), and ``TextToImage`` reads it twice per network call."""
    dt = next(unet.parameters()).dtype
    unet.__class__ = type(f"{type(unet).__name__}CachedDtype", (type(unet),), {"dtype": property(lambda self: dt)})


def _pipeline(t2i: Any, scheduler: Any) -> Any:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=t2i.vae,
        text_encoder=t2i.text_encoder,
        tokenizer=t2i.tokenizer,
        unet=t2i.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run_pipe(pipe: Any, pe: Tensor, ne: Tensor, lat: Tensor, steps: int) -> Tensor:
    with torch.no_grad():
        return pipe(  # type: ignore[no-any-return]
            prompt_embeds=pe,
            negative_prompt_embeds=ne,
            guidance_scale=GUIDANCE,
            num_inference_steps=steps,
            latents=lat.clone(),
            output_type="latent",
        ).images


def _run_sample(model: Any, b: int, slv: Any, ts: Tensor, lat: Tensor, schedule: Any, shape: tuple[int, ...]) -> Tensor:
    with torch.no_grad():
        return dpmlab.sample(
            model,
            n=b,
            solver=slv,
            nfe=None,
            grid=ts,
            cond={"prompt": PROMPT},
            x_T=lat,  # the pipeline's start latents (VP: the same variable)
            schedule=schedule,
            shape=shape,
        )


def t2i_cases(nfes: Sequence[int], batches: Sequence[int]) -> Iterator[tuple[Any, ...]]:
    """Per (algorithm, NFE, batch): the variants (callables returning latents) and the UNet counters."""
    import diffusers
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    t2i = dpmlab.load("mnist_t2i")
    sched_cfg = json.loads(
        (Path(dpmlab.__file__).parent / "assets/mnist_t2i/scheduler/scheduler_config.json").read_text()
    )
    schedule = t2i.schedule
    counters = [CallCounter(t2i.unet)]
    with torch.no_grad():
        pos, neg = t2i.encode_prompt(PROMPT, 1), t2i.encode_prompt(NEGATIVE, 1)
    guided, onecall = t2i.guided(GUIDANCE, NEGATIVE), OneCallCFG(t2i, PROMPT, NEGATIVE, GUIDANCE)
    fast = dpmlab.load("mnist_t2i")  # a second copy whose UNet reports its dtype without a module walk
    cached_dtype(fast.unet)
    counters.append(CallCounter(fast.unet))
    onecall_fast = OneCallCFG(fast, PROMPT, NEGATIVE, GUIDANCE)
    for label, cls_name, kw, solver, sopt in PAIRS:
        for nfe in nfes:
            for b in batches:
                cfg = {k: v for k, v in sched_cfg.items() if not k.startswith("_")}
                theirs = getattr(diffusers, cls_name).from_config({**cfg, **kw})
                steps = _steps_for(theirs, nfe)
                assert steps is not None, (label, nfe)
                theirs.set_timesteps(steps)
                ts = scheduler_grid(theirs.timesteps, schedule, _final_t(theirs, schedule))
                ours_s = DPMLabScheduler.from_config(cfg, solver=solver, solver_options=sopt, budget="nfe")
                # on diffusers' grid exactly (a benchmark-only override: DPMLabScheduler's own spacing
                # rules put the evaluations elsewhere, at the same cost)
                object.__setattr__(ours_s, "make_grid", lambda steps, ts=ts: ts)
                lat = torch.randn(b, *t2i.data_shape, generator=torch.Generator().manual_seed(0))
                pipe_t, pipe_o = _pipeline(t2i, theirs), _pipeline(t2i, ours_s)
                pe, ne = pos.expand(b, -1, -1).clone(), neg.expand(b, -1, -1).clone()
                slv = get(solver, **sopt)
                shape = tuple(t2i.data_shape)
                variants: dict[str, Callable[[], Tensor]] = {
                    "diffusers pipeline": partial(_run_pipe, pipe_t, pe, ne, lat, steps),
                    TWO: partial(_run_sample, guided, b, slv, ts, lat, schedule, shape),
                    ONE: partial(_run_sample, onecall, b, slv, ts, lat, schedule, shape),
                    ONE_FAST: partial(_run_sample, onecall_fast, b, slv, ts, lat, schedule, shape),
                    "pipeline + DPMLabScheduler": partial(_run_pipe, pipe_o, pe, ne, lat, nfe),
                }
                yield label, nfe, b, variants, counters
    for c in counters:
        c.remove()


def counted(f: Callable[[], Tensor], counters: Sequence[CallCounter]) -> tuple[Tensor, int, int, float, float]:
    """One run of ``f``: (output, network calls, rows, wall seconds, seconds inside the network)."""
    for c in counters:
        c.reset()
    t0 = time.perf_counter()
    y = f()
    wall = time.perf_counter() - t0
    return y, sum(c.calls for c in counters), sum(c.rows for c in counters), wall, sum(c.seconds for c in counters)


def section_t2i(reps: int, nfes: Sequence[int], batches: Sequence[int]) -> dict[str, Any]:
    rows, out = [], []
    for label, nfe, b, variants, counters in t2i_cases(nfes, batches):
        outs, calls = {}, {}
        for k, f in variants.items():  # one counted run each (also the outputs compared)
            y, n_calls, n_rows, _, _ = counted(f, counters)
            outs[k], calls[k] = y, (n_calls, n_rows)
        la = load_str()
        res = interleaved(dict(variants), reps)
        base = res["diffusers pipeline"]["median"]
        for k, r in res.items():
            ms = r["median"] / b * 1e3
            d = max_diff(outs[k], outs["diffusers pipeline"])
            rows.append(
                [label, nfe, b, k, f"{ms:.2f}", f"{r['median'] / base:.2f}", f"{calls[k][0]} / {calls[k][1]}"]
                + [f"{d:.1e}", la]
            )
            out.append(
                dict(pair=label, nfe=nfe, batch=b, variant=k, ms_per_image=ms, ratio_to_diffusers=r["median"] / base)
                | dict(min_s=r["min"], max_s=r["max"], unet_calls=calls[k][0], unet_rows=calls[k][1])
                | dict(max_abs_diff_vs_diffusers=d, loadavg=la)
            )
        print(table(HEAD_T2I, rows[-len(variants) :]), flush=True)
    return {"rows": out, "reps": reps, "table": table(HEAD_T2I, rows)}


HEAD_T2I = ["algorithm", "NFE", "batch", "variant", "ms/image", "÷ diffusers", "UNet calls / rows", "max |Δ|", "load"]


# --- mnist ----------------------------------------------------------------------------------------
def _diffusers_loop(sch: Any, net: Any, x: Tensor, steps: int) -> Tensor:
    """diffusers' standard loop around the raw network (v-prediction, training-index time)."""
    with torch.no_grad():
        sch.set_timesteps(steps)
        s = x * sch.init_noise_sigma
        for t in sch.timesteps:
            v = net(sch.scale_model_input(s, t), t.float().expand(s.shape[0]))
            s = sch.step(v, t, s).prev_sample
        return s  # type: ignore[no-any-return]


def _run_mnist(model: Any, slv: Any, nfe: int, ts: Tensor, x: Tensor) -> Tensor:
    with torch.no_grad():
        return dpmlab.sample(model, n=x.shape[0], solver=slv, nfe=nfe, grid=ts, x_T=x)


def mnist_cases(nfes: Sequence[int], batches: Sequence[int]) -> Iterator[tuple[Any, ...]]:
    """Per (algorithm, NFE, batch): the two variants, the network counter and dpmlab's sampler-only
    overhead per step (``dpmlab.bench.harness._overhead_ms``, trivial model)."""
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    model = dpmlab.load("mnist")
    schedule, net = model.schedule, model.net
    counter = CallCounter(net)
    for label, cls_name, kw, solver, sopt in PAIRS:
        for nfe in nfes:
            sch = peer_scheduler(cls_name, {**kw, "prediction_type": "v_prediction"}, schedule)
            steps = _steps_for(sch, nfe)
            assert steps is not None, (label, nfe)
            sch.set_timesteps(steps)
            ts = scheduler_grid(sch.timesteps, schedule, _final_t(sch, schedule))
            slv = get(solver, **sopt)
            overhead = _overhead_ms(slv, schedule, ts, tuple(model.data_shape))
            for b in batches:
                x = torch.randn(b, *model.data_shape, generator=torch.Generator().manual_seed(0))
                variants: dict[str, Callable[[], Tensor]] = {
                    "diffusers loop": partial(_diffusers_loop, sch, net, x, steps),
                    "dpmlab.sample": partial(_run_mnist, model, slv, nfe, ts, x),
                }
                yield label, nfe, b, variants, [counter], overhead
    counter.remove()


def section_mnist(reps: int, nfes: Sequence[int], batches: Sequence[int]) -> dict[str, Any]:
    rows, out = [], []
    for label, nfe, b, variants, counters, overhead in mnist_cases(nfes, batches):
        outs, calls = {}, {}
        for k, f in variants.items():
            y, n_calls, n_rows, _, _ = counted(f, counters)
            outs[k], calls[k] = y, (n_calls, n_rows)
        la = load_str()
        res = interleaved(dict(variants), reps)
        base = res["diffusers loop"]["median"]
        d = max_diff(outs["dpmlab.sample"], outs["diffusers loop"])
        for k, r in res.items():
            ms = r["median"] / b * 1e3
            ours = k != "diffusers loop"
            rows.append(
                [label, nfe, b, k, f"{ms:.2f}", f"{r['median'] / base:.3f}", f"{calls[k][0]} / {calls[k][1]}"]
                + [f"{d:.1e}" if ours else "", f"{overhead:.3f}" if ours else "", la]
            )
            out.append(
                dict(pair=label, nfe=nfe, batch=b, variant=k, ms_per_image=ms, ratio_to_diffusers=r["median"] / base)
                | dict(min_s=r["min"], max_s=r["max"], net_calls=calls[k][0], net_rows=calls[k][1])
                | dict(max_abs_diff=d, dpmlab_overhead_ms_per_step=overhead, loadavg=la)
            )
        print(table(HEAD_MNIST, rows[-2:]), flush=True)
    return {"rows": out, "reps": reps, "table": table(HEAD_MNIST, rows)}


def section_split(runs: int, nfes: Sequence[int], batches: Sequence[int]) -> dict[str, Any]:
    """Time outside the network per NFE (wall minus the time inside the network's forward, timed by
    hooks in the same run; median of ``runs``): the sampler + wrapper + pipeline overhead, robust to
    load because both parts of one run see the same machine."""
    out: list[dict[str, Any]] = []
    cases = itertools.chain(  # lazily: each generator removes its hooks when exhausted
        (("mnist_t2i", c[:5]) for c in t2i_cases(nfes, batches)),
        (("mnist", c[:5]) for c in mnist_cases(nfes, batches)),
    )
    rows = []
    for name, (label, nfe, b, variants, counters) in cases:
        for k, f in variants.items():
            f()  # warm-up
            meas = [counted(f, counters) for _ in range(runs)]
            outside = statistics.median((m[3] - m[4]) / nfe * 1e3 for m in meas)
            share = statistics.median(m[4] / m[3] for m in meas)
            rows.append([name, label, nfe, b, k, f"{outside:.2f}", f"{share:.3f}", load_str()])
            out.append(dict(model=name, pair=label, nfe=nfe, batch=b, variant=k, outside_ms_per_nfe=outside))
            out[-1] |= dict(network_share=share, loadavg=rows[-1][-1])
        print(table(HEAD_SPLIT, rows[-len(variants) :]), flush=True)
    return {"rows": out, "runs": runs, "table": table(HEAD_SPLIT, rows)}


HEAD_SPLIT = ["model", "algorithm", "NFE", "batch", "variant", "ms outside the network per NFE"]
HEAD_SPLIT += ["share of wall time inside the network", "load"]


HEAD_MNIST = [
    "algorithm",
    "NFE",
    "batch",
    "variant",
    "ms/image",
    "÷ diffusers",
    "net calls / rows",
    "max |Δ|",
    "sampler overhead ms/step (harness)",
    "load",
]


# --- parts: the same ratios predicted from their parts (best-of-n timings, robust to load) ----------
def _best_ms(f: Callable[[], Any], n: int) -> float:
    f()
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def section_parts(batches: Sequence[int], reps: int) -> dict[str, Any]:
    """Network time per call and sampler time per step (trivial model; ``benchmarks/overhead.py``'s
    ``time_dpmlab`` / ``time_diffusers``, best of 20), at the two models' shapes; the predicted
    per-step ratio ``(net + ours) / (net + theirs)``."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import overhead  # benchmarks/overhead.py: the sampler-only timing, reused

    mnist, t2i = dpmlab.load("mnist"), dpmlab.load("mnist_t2i")
    st = t2i.encode_prompt(PROMPT, 1)
    out: dict[str, Any] = {"net": [], "sampler": [], "loadavg": load_str()}
    with torch.no_grad():
        for b in batches:
            x = torch.randn(b, *mnist.data_shape)
            ms = _best_ms(lambda x=x: mnist.net(x, torch.full((x.shape[0],), 500.0)), reps)
            out["net"].append(dict(model="mnist", rows=b, ms_per_call=ms))
        for rows in sorted({r for b in batches for r in (b, 2 * b)}):
            z, s = torch.randn(rows, *t2i.data_shape), st.expand(rows, -1, -1)
            ms = _best_ms(lambda z=z, s=s: t2i.unet(z, torch.full((z.shape[0],), 500.0), encoder_hidden_states=s), reps)
            out["net"].append(dict(model="mnist_t2i", rows=rows, ms_per_call=ms))
    out["unet_dtype_ms"] = _best_ms(lambda: t2i.unet.dtype, 200)
    for label, cls_name, kw, solver, sopt in PAIRS:
        for name, m in (("mnist", mnist), ("mnist_t2i", t2i)):
            for b in batches:
                x = torch.randn(b, *m.data_shape)
                sch = peer_scheduler(cls_name, kw, m.schedule)
                ours = overhead.time_dpmlab(get(solver, **sopt), m.schedule, x) * 1e3
                theirs = overhead.time_diffusers(sch, x) * 1e3
                out["sampler"].append(dict(pair=label, model=name, batch=b, dpmlab_ms=ours, diffusers_ms=theirs))
    rows = []
    for r in out["sampler"]:
        net = {(n["model"], n["rows"]): n["ms_per_call"] for n in out["net"]}
        b = r["batch"]
        if r["model"] == "mnist":
            pred = (net["mnist", b] + r["dpmlab_ms"]) / (net["mnist", b] + r["diffusers_ms"])
            pred_s = f"{pred:.3f}"
        else:  # per NFE: dpmlab today 2 calls of b rows (+ 4 dtype reads), diffusers 1 call of 2b rows
            d = out["unet_dtype_ms"]
            today = (2 * net["mnist_t2i", b] + 4 * d + r["dpmlab_ms"]) / (net["mnist_t2i", 2 * b] + r["diffusers_ms"])
            one = (net["mnist_t2i", 2 * b] + r["dpmlab_ms"]) / (net["mnist_t2i", 2 * b] + r["diffusers_ms"])
            pred_s = f"{today:.2f} today; {one:.3f} 1-call CFG, cached dtype"
        netb = net[r["model"], b if r["model"] == "mnist" else 2 * b]
        rows.append(
            [r["pair"], r["model"], b, f"{netb:.2f}", f"{r['dpmlab_ms']:.3f}", f"{r['diffusers_ms']:.3f}", pred_s]
        )
    head = ["algorithm", "model", "batch", "network ms/call (diffusers' rows)", "dpmlab sampler ms/step"]
    head += ["diffusers scheduler ms/step", "predicted ÷ diffusers per NFE"]
    out["table"] = table(head, rows)
    out["net_table"] = table(
        ["model", "rows per call", "ms per call (best of n)"],
        [[n["model"], n["rows"], f"{n['ms_per_call']:.2f}"] for n in out["net"]],
    )
    print(out["net_table"], "\n", f"unet.dtype: {out['unet_dtype_ms']:.2f} ms per read", "\n", out["table"], flush=True)
    return out


# --- options --------------------------------------------------------------------------------------
def _grad_mode(mode: str) -> Any:
    return {"none": nullcontext, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[mode]()


def _run_opt(m: Any, mode: str, b: int, nfe: int) -> Tensor:
    """``dpmlab.sample`` of the model (the t2i model with CFG on the prompt) under a grad mode."""
    t2i = hasattr(m, "unet")
    model, cond = (m.guided(GUIDANCE, NEGATIVE), {"prompt": PROMPT}) if t2i else (m, None)
    with _grad_mode(mode):
        return dpmlab.sample(model, n=b, solver="dpm_solver_pp", nfe=nfe, seed=0, cond=cond)


def section_options(reps: int, nfe: int, batches: Sequence[int], compile_: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"rows": [], "reps": reps}
    rows = []
    out["cxx"] = shutil.which("g++") or shutil.which("c++")  # inductor on the CPU compiles C++
    for name in ("mnist", "mnist_t2i"):
        for b in batches:
            base = dpmlab.load(name)
            t2i = name == "mnist_t2i"

            cl = copy.deepcopy(base)
            (cl.unet if t2i else cl.net).to(memory_format=torch.channels_last)
            variants: dict[str, Callable[[], Tensor]] = {
                "as today (no context)": partial(_run_opt, base, "none", b, nfe),
                "no_grad": partial(_run_opt, base, "no_grad", b, nfe),
                "inference_mode": partial(_run_opt, base, "inference_mode", b, nfe),
                "channels_last (no_grad)": partial(_run_opt, cl, "no_grad", b, nfe),
            }
            compile_s, compile_err = float("nan"), ""
            if compile_ and b == max(batches):  # one compile per network (minutes on one thread)
                cm = copy.deepcopy(base)
                try:
                    if t2i:
                        cm.unet = torch.compile(cm.unet)
                    else:
                        cm.net = torch.compile(cm.net)
                    t0 = time.perf_counter()
                    _run_opt(cm, "no_grad", b, nfe)
                    compile_s = time.perf_counter() - t0
                    variants["torch.compile (no_grad)"] = partial(_run_opt, cm, "no_grad", b, nfe)
                except Exception as e:  # noqa: BLE001 - report the compiler error plainly
                    compile_err = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                    print("torch.compile failed:", compile_err, flush=True)
            ref = variants["as today (no context)"]()
            diffs = {k: max_diff(f(), ref) for k, f in variants.items()}
            la = load_str()
            res = interleaved(dict(variants), reps)
            b0 = res["as today (no context)"]["median"]
            for k, r in res.items():
                ms = r["median"] / b * 1e3
                rows.append([name, b, nfe, k, f"{ms:.2f}", f"{r['median'] / b0:.3f}", f"{diffs[k]:.1e}", la])
                out["rows"].append(
                    dict(
                        model=name,
                        batch=b,
                        nfe=nfe,
                        variant=k,
                        ms_per_image=ms,
                        ratio=r["median"] / b0,
                        min_s=r["min"],
                        max_s=r["max"],
                        max_abs_diff=diffs[k],
                        loadavg=la,
                        compile_s=compile_s if "compile" in k else None,
                    )
                )
            if compile_ and b == max(batches):
                out.setdefault("compile", []).append(
                    dict(model=name, batch=b, first_call_s=compile_s, error=compile_err)
                )
            print(table(HEAD_OPT, rows[-len(res) :]), flush=True)
            if compile_ and b == max(batches):
                print(
                    f"torch.compile first call (compile + one sample) {name} batch {b}: {compile_s:.1f} s {compile_err}"
                )
    out["table"] = table(HEAD_OPT, rows)
    return out


def section_trainable(reps: int, nfe: int, batches: Sequence[int]) -> dict[str, Any]:
    """A user's network whose parameters still require grad (e.g. straight out of training): what
    ``dpmlab.sample`` costs today (autograd records every step) vs under ``torch.no_grad``."""
    out: dict[str, Any] = {"rows": [], "reps": reps}
    rows = []
    for b in batches:
        m = dpmlab.load("mnist")
        m.net.requires_grad_(True)
        variants: dict[str, Callable[[], Tensor]] = {
            "as today (no context)": partial(_run_opt, m, "none", b, nfe),
            "no_grad": partial(_run_opt, m, "no_grad", b, nfe),
        }
        ref = variants["no_grad"]()
        grad_kept = variants["as today (no context)"]().requires_grad
        la = load_str()
        res = interleaved(dict(variants), reps)
        b0 = res["as today (no context)"]["median"]
        for k, r in res.items():
            ms = r["median"] / b * 1e3
            d = max_diff(variants[k]().detach(), ref)
            rows.append(["mnist (trainable)", b, nfe, k, f"{ms:.2f}", f"{r['median'] / b0:.3f}", f"{d:.1e}", la])
            out["rows"].append(
                dict(model="mnist (params require grad)", batch=b, nfe=nfe, variant=k, ms_per_image=ms)
                | dict(ratio=r["median"] / b0, min_s=r["min"], max_s=r["max"], max_abs_diff=d, loadavg=la)
            )
        out.setdefault("output_requires_grad_today", grad_kept)
        print(table(HEAD_OPT, rows[-2:]), flush=True)
    return out


HEAD_OPT = ["model", "batch", "NFE", "variant", "ms/image", "÷ as today", "max |Δ| vs as today", "load"]


# --- calibrate ------------------------------------------------------------------------------------
# (kind, reduced settings to run, the CLI defaults to extrapolate to, the size variable)
CALIB: list[tuple[str, list[dict[str, int]], dict[str, int]]] = [
    ("ems", [{"n": 4, "grid_size": 20}, {"n": 8, "grid_size": 20}], {"n": 1024, "grid_size": 200}),
    ("dc", [{"n": 2}, {"n": 4}], {"n": 10}),
    ("grid", [{"n": 8}, {"n": 16}], {"n": 128}),
    ("s3", [{"n": 4, "generations": 1}, {"n": 8, "generations": 1}], {"n": 256, "generations": 10}),
]


def _cli(kind: str, nfe: int, s: dict[str, int], out: Path) -> tuple[float, float, str]:
    cmd = [sys.executable, "-m", "dpmlab", "calibrate", kind, "--model", "mnist", "--nfe", str(nfe), "-n", str(s["n"])]
    if "grid_size" in s:
        cmd += ["--grid-size", str(s["grid_size"])]
    if "generations" in s:
        cmd += ["--generations", str(s["generations"])]
    cmd += ["--out", str(out), "--threads", "1", "--overwrite"]
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    msg = p.stdout.strip().splitlines()[-1] if p.returncode == 0 and p.stdout.strip() else p.stderr.strip()[-300:]
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {msg}")
    return wall, cpu, msg


def calib_table(rows: list[dict[str, Any]]) -> str:
    body = [
        [r["kind"], json.dumps(r["settings"]), f"{r['wall_s']:.0f}", f"{r['cpu_s']:.0f}"]
        + ["extrapolated (linear in size)" if r.get("extrapolated") else "measured", r.get("loadavg", "")]
        for r in rows
        if "wall_s" in r
    ]
    return table(["kind", "settings", "wall s", "CPU s", "how", "load"], body)


def _size(kind: str, s: dict[str, int]) -> float:
    """The work a calibration scales with: points x knots (ems), trajectories (dc, grid), samples x
    generations (s3; plus the fixed reference solutions, absorbed in the intercept)."""
    if kind == "ems":
        return float(s["n"] * (s["grid_size"] + 1))
    if kind == "s3":
        return float(s["n"] * s["generations"])
    return float(s["n"])


def section_calibrate(nfe: int, kinds: Sequence[str], path: Path) -> dict[str, Any]:
    """Runs the CLI at the reduced sizes of ``CALIB``; each measurement is saved to ``path`` as it comes
    (under the key ``calibrate``), so an interrupted run keeps what it measured."""
    prev = json.loads(path.read_text()).get("calibrate", {}) if path.exists() else {}
    out: dict[str, Any] = {"rows": [r for r in prev.get("rows", []) if r.get("kind") not in kinds], "nfe": nfe}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, settings, default in CALIB:
            if kind not in kinds:
                continue
            pts = []
            for s in settings:
                suffix = ".json" if kind == "s3" else ".safetensors"
                la = load_str()
                try:
                    wall, cpu, msg = _cli(kind, nfe, s, Path(tmp) / f"{kind}{suffix}")
                except RuntimeError as e:
                    print(e, flush=True)
                    out["rows"].append(dict(kind=kind, settings=s, error=str(e)))
                    continue
                pts.append((_size(kind, s), wall, cpu))
                rows.append([kind, json.dumps(s), f"{wall:.1f}", f"{cpu:.1f}", "measured", la])
                out["rows"].append(dict(kind=kind, settings=s, wall_s=wall, cpu_s=cpu, message=msg, loadavg=la))
                out["table"] = calib_table(out["rows"])
                save(path, "calibrate", out)
                print(rows[-1], flush=True)
            if len(pts) == 2 and pts[1][0] != pts[0][0]:
                (x0, w0, c0), (x1, w1, c1) = pts
                xd = _size(kind, default)
                w = w0 + (w1 - w0) / (x1 - x0) * (xd - x0)
                c = c0 + (c1 - c0) / (x1 - x0) * (xd - x0)
                rows.append(
                    [kind, json.dumps(default) + " (CLI default)", f"~{w:.0f}", f"~{c:.0f}", "extrapolated", ""]
                )
                out["rows"].append(dict(kind=kind, settings=default, wall_s=w, cpu_s=c, extrapolated=True))
                print(rows[-1], flush=True)
    out["table"] = calib_table(out["rows"])
    print(out["table"])
    return out


# --- tables for the doc, from the JSON ------------------------------------------------------------
def _r(rows: list[dict[str, Any]], key: str, base: dict[str, Any]) -> str:
    """``median-ratio (min-ratio)`` of one variant against the baseline row."""
    m = next(r for r in rows if r["variant"] == key)
    return (
        f"{m['ms_per_image']:.1f} ({m['ms_per_image'] / base['ms_per_image']:.2f} / {m['min_s'] / base['min_s']:.2f})"
    )


TWO, ONE, ONE_FAST = (
    "dpmlab.sample (2-call CFG)",
    "dpmlab.sample (1-call CFG)",
    "dpmlab.sample (1-call CFG, cached dtype)",
)


def _geomeans(rows: list[dict[str, Any]], base: str) -> str:
    """Geometric mean over the (algorithm, NFE, batch) cells of each variant's ratio of medians."""
    out = []
    for v in dict.fromkeys(r["variant"] for r in rows if r["variant"] != base):
        logs = [math.log(r["ratio_to_diffusers"]) for r in rows if r["variant"] == v]
        out.append(f"{v} {math.exp(sum(logs) / len(logs)):.2f}")
    return f"Geometric mean over the {len(logs)} cells of ÷ {base} (medians): " + "; ".join(out) + "."


def render(data: dict[str, Any]) -> str:
    """The markdown tables of docs/benchmarks/walltime.md from the results file."""
    parts = []
    if "t2i" in data:
        rows, head = (
            data["t2i"]["rows"],
            [
                "algorithm",
                "NFE",
                "batch",
                "diffusers pipeline ms/img",
                "dpmlab.sample, 2-call CFG: ms/img (÷ median / ÷ min)",
                "dpmlab.sample, 1-call CFG",
                "dpmlab.sample, 1-call CFG, cached dtype",
                "pipeline + DPMLabScheduler",
                "UNet calls/rows: diffusers, dpmlab 2-call, 1-call",
                "max |Δ| vs diffusers (all variants)",
                "load",
            ],
        )
        out = []
        for key in dict.fromkeys((r["pair"], r["nfe"], r["batch"]) for r in rows):
            g = [r for r in rows if (r["pair"], r["nfe"], r["batch"]) == key]
            b = next(r for r in g if r["variant"] == "diffusers pipeline")
            two = next(r for r in g if r["variant"] == TWO)
            one = next(r for r in g if r["variant"] == ONE)
            calls = ", ".join(f"{r['unet_calls']}/{r['unet_rows']}" for r in (b, two, one))
            diff = max(r["max_abs_diff_vs_diffusers"] for r in g)
            out.append(
                [*key, f"{b['ms_per_image']:.1f}"]
                + [_r(g, v, b) for v in (TWO, ONE, ONE_FAST)]
                + [_r(g, "pipeline + DPMLabScheduler", b), calls, f"{diff:.1e}", b["loadavg"]]
            )
        parts.append(table(head, out) + "\n\n" + _geomeans(rows, "diffusers pipeline"))
    if "mnist" in data:
        rows, out = data["mnist"]["rows"], []
        for key in dict.fromkeys((r["pair"], r["nfe"], r["batch"]) for r in rows):
            g = [r for r in rows if (r["pair"], r["nfe"], r["batch"]) == key]
            b = next(r for r in g if r["variant"] == "diffusers loop")
            o = next(r for r in g if r["variant"] == "dpmlab.sample")
            out.append(
                [*key, f"{b['ms_per_image']:.1f}", _r(g, "dpmlab.sample", b)]
                + [f"{b['net_calls']}/{b['net_rows']}, {o['net_calls']}/{o['net_rows']}", f"{o['max_abs_diff']:.1e}"]
                + [f"{o['dpmlab_overhead_ms_per_step']:.3f}", b["loadavg"]]
            )
        head = ["algorithm", "NFE", "batch", "diffusers loop ms/img", "dpmlab.sample ms/img (÷ median / ÷ min)"]
        head += ["net calls/rows: diffusers, dpmlab", "max |Δ|", "dpmlab sampler overhead ms/step", "load"]
        parts.append(table(head, out) + "\n\n" + _geomeans(rows, "diffusers loop"))
    if "split" in data:
        parts.append(data["split"]["table"])
    if "parts" in data:
        p = data["parts"]
        parts.append(p["net_table"] + f"\n\n`unet.dtype`: {p['unet_dtype_ms']:.2f} ms per read (load {p['loadavg']})")
        parts.append(p["table"])
    if "options" in data:
        parts.append(_variants_table(data["options"]["rows"]))
    if "trainable" in data:
        parts.append(_variants_table(data["trainable"]["rows"]))
    if "calibrate" in data:
        parts.append(data["calibrate"]["table"])
    return "\n\n".join(parts)


def _variants_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: per (model, batch, NFE) each variant's time against "as today (no context)"."""
    out = []
    for key in dict.fromkeys((r["model"], r["batch"], r["nfe"]) for r in rows):
        g = [r for r in rows if (r["model"], r["batch"], r["nfe"]) == key]
        b = next(r for r in g if r["variant"] == "as today (no context)")
        for r in g:
            out.append([*key, r["variant"], _r(g, r["variant"], b), f"{r['max_abs_diff']:.1e}", r["loadavg"]])
    head = ["model", "batch", "NFE", "variant", "ms/img (÷ median / ÷ min vs as today)", "max |Δ|", "load"]
    return table(head, out)


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default="t2i,mnist,split,parts,trainable,options,calibrate")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--nfes", default="10,25")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--options-nfe", type=int, default=10)
    ap.add_argument("--options-batches", default="1,16")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--calib-nfe", type=int, default=8)
    ap.add_argument("--calib-kinds", default="ems,dc,grid,s3")
    ap.add_argument("--json", default=str(JSON), help="results file (each section updates its key)")
    ap.add_argument("--render", action="store_true", help="print the doc's tables from --json and exit")
    args = ap.parse_args(argv)
    if args.render:
        print(render(json.loads(Path(args.json).read_text())))
        return 0
    sections = [s for s in args.sections.split(",") if s]
    bad = set(sections) - {"t2i", "mnist", "split", "parts", "options", "trainable", "calibrate"}
    if bad or args.reps < 1:
        print(f"error: unknown sections {sorted(bad)} or reps < 1", file=sys.stderr)
        return 2
    meta = dict(torch=torch.__version__, threads=torch.get_num_threads(), cpu_count=os.cpu_count())
    for sec in sections:
        t0 = time.perf_counter()
        print(f"## {sec} (load {load_str()})", flush=True)
        if sec == "t2i":
            res = section_t2i(args.reps, _ints(args.nfes), _ints(args.batches))
        elif sec == "mnist":
            res = section_mnist(args.reps, _ints(args.nfes), _ints(args.batches))
        elif sec == "split":
            res = section_split(3, [args.options_nfe], _ints(args.batches))
        elif sec == "parts":
            res = section_parts(_ints(args.batches), 10)
        elif sec == "trainable":
            res = section_trainable(args.reps, args.options_nfe, _ints(args.options_batches))
        elif sec == "options":
            res = section_options(args.reps, args.options_nfe, _ints(args.options_batches), not args.no_compile)
        else:
            res = section_calibrate(args.calib_nfe, args.calib_kinds.split(","), Path(args.json))
        res["meta"] = {**meta, "section_wall_s": time.perf_counter() - t0, "loadavg_end": load_str()}
        save(Path(args.json), sec, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
