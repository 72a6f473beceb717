"""diffusers interop: schedules from scheduler configs, and running an unchanged diffusers scheduler
on any dpmlab model (for parity tests and peer benchmarks).

The model side is a dpmlab ``DenoiserFn`` (returns ``x0``); it is presented to the scheduler in the
scheduler's own ``prediction_type`` (epsilon, sample or v_prediction) at the VP state the scheduler
feeds its network (``scale_model_input``), with the training index ``n`` mapped to ``t = (n+1)/N``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._utils import f64
from ..models.diffusers_folder import denoiser_from_diffusers as denoiser_from_diffusers  # models layer; re-exported
from ..models.diffusers_folder import load_diffusers_folder as load_diffusers_folder
from ..schedules import DiscreteVP, schedule_from_config
from ..typing import DenoiserFn

__all__ = ["schedule_from_config", "run_scheduler", "PeerRun", "scheduler_grid"]


def scheduler_grid(timesteps: Tensor, schedule: DiscreteVP, final_t: float) -> Tensor:
    """Continuous-time grid visiting a scheduler's (de-duplicated) timesteps, then ``final_t``."""
    seen: list[float] = []
    for t in timesteps.tolist():
        if not seen or seen[-1] != t:
            seen.append(float(t))
    return torch.cat([schedule.index_to_t(f64(seen)), f64([final_t])])


@dataclass(frozen=True)
class PeerRun:
    x: Tensor  # final sample
    nfe: int  # network evaluations made by the scheduler loop


def run_scheduler(
    scheduler: Any,
    model: DenoiserFn,
    schedule: DiscreteVP,
    x: Tensor,
    num_inference_steps: int,
    *,
    generator: torch.Generator | None = None,
    step_kwargs: Mapping[str, Any] | None = None,
) -> PeerRun:
    """Run a diffusers scheduler's standard loop with ``model`` from the starting noise ``x`` (unit
    variance; scaled by ``init_noise_sigma`` here)."""
    scheduler.set_timesteps(num_inference_steps)
    pred = scheduler.config.get("prediction_type", "epsilon")
    n_train = schedule.n_train
    sample = x * scheduler.init_noise_sigma
    nfe = 0
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(sample, t)  # the VP state the network sees
        tc = ((f64(t) + 1.0) / n_train).expand(x.shape[0])
        x0 = model(x_in, tc)
        nfe += 1
        a = schedule.alpha(tc[:1]).to(x_in.dtype)
        s = schedule.sigma(tc[:1]).to(x_in.dtype)
        eps = (x_in - a * x0) / s
        if pred == "epsilon":
            out = eps
        elif pred == "sample":
            out = x0
        elif pred == "v_prediction":
            out = a * eps - s * x0
        else:
            raise ValueError(f"unsupported prediction_type {pred!r}")
        kwargs = dict(step_kwargs or {})
        if generator is not None:
            kwargs["generator"] = generator
        sample = scheduler.step(out, t, sample, **kwargs).prev_sample
    return PeerRun(x=sample, nfe=nfe)


# --- DPMLabScheduler: any dpmlab solver inside an unchanged diffusers pipeline --------------------
_EVAL, _DONE, _ERROR, _STOP = "eval", "done", "error", "stop"

# Options of other diffusers schedulers that would change the grid or the ODE; a value other than the
# neutral one is refused with the name of the option (the rest of a foreign scheduler's options select
# its own algorithm, which ``solver=`` replaces; diffusers drops them when switching schedulers).
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "use_karras_sigmas": (False, None),
    "use_exponential_sigmas": (False, None),
    "use_beta_sigmas": (False, None),
    "use_lu_lambdas": (False, None),
    "use_flow_sigmas": (False, None),
    "use_dynamic_shifting": (False, None),
    "final_sigmas_type": ("zero", None),
    "timestep_type": ("discrete", None),
    "sigma_min": (None,),
    "sigma_max": (None,),
}
_HINT = {
    "use_karras_sigmas": "grid='karras'",
    "use_lu_lambdas": "grid='uniform_lambda'",
    "final_sigmas_type": "to_zero=False",
}
_BUDGETS = ("steps", "nfe")
_SPACINGS = ("linspace", "leading", "trailing")


class _Abort(Exception):
    pass


class _StepThread:
    """Runs one call ``job(model)`` (a solver step) in a worker thread whose model calls are handed to
    the caller: diffusers pipelines own the loop (``out = unet(x, t); x = scheduler.step(out, t, x)``)
    while dpmlab solvers call the model themselves. The handoff is strictly alternating, so the result
    is deterministic: ``answer(x0)`` returns the next model request ``(x, t)`` or the job's result."""

    def __init__(self, job: Any) -> None:
        import queue
        import threading

        self.requests: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.responses: queue.Queue[tuple[str, Any]] = queue.Queue()

        def model(x: Tensor, t: Tensor, **cond: Any) -> Tensor:
            self.requests.put((_EVAL, (x, t)))
            kind, value = self.responses.get()
            if kind == _STOP:
                raise _Abort
            return value  # type: ignore[no-any-return]

        def run() -> None:
            try:
                self.requests.put((_DONE, job(model)))
            except _Abort:
                pass
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                self.requests.put((_ERROR, e))

        self.thread = threading.Thread(target=run, daemon=True, name="dpmlab-solver")
        self.thread.start()

    def next(self) -> tuple[str, Any]:
        kind, value = self.requests.get()
        if kind == _ERROR:
            raise value
        return kind, value

    def answer(self, x0: Tensor) -> tuple[str, Any]:
        self.responses.put((_EVAL, x0))
        return self.next()

    def stop(self) -> None:
        if self.thread.is_alive():
            self.responses.put((_STOP, None))
            self.thread.join(timeout=5)


def _identity(x: Tensor, t: Tensor, **cond: Any) -> Tensor:
    return x


def _generator_noise(generator: Any, like: Tensor) -> Tensor:
    """Standard normal noise shaped like ``like`` from a pipeline's ``generator`` (one, or one per row)."""
    if isinstance(generator, list | tuple):
        if len(generator) != like.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {like.shape[0]}; give one per sample")
        rows = [_generator_noise(g, like[b : b + 1]) for b, g in enumerate(generator)]
        return torch.cat(rows)
    dev = generator.device if isinstance(generator, torch.Generator) else like.device
    z = torch.randn(like.shape, generator=generator, dtype=like.dtype, device=dev)
    return z.to(like.device)


def _scheduler_class() -> type:
    try:
        from diffusers.configuration_utils import ConfigMixin, register_to_config
        from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin, SchedulerOutput
    except ImportError as e:  # pragma: no cover - diffusers is a dev dependency
        raise ImportError("DPMLabScheduler needs diffusers (pip install diffusers)") from e

    from .. import timesteps as grids
    from .._utils import state_dtype
    from ..api import DEFAULT_GRID, make_grid
    from ..models.guidance import DynamicThreshold
    from ..solvers.base import Problem, get, iterate

    class DPMLabScheduler(SchedulerMixin, ConfigMixin):  # type: ignore[misc]
        """A diffusers scheduler that runs any dpmlab solver.

        ``set_timesteps(n)``: ``n`` solver steps (``budget="steps"``, as diffusers: Heun with ``n`` steps
        costs ``2n - 1`` evaluations) or exactly ``n`` evaluations (``budget="nfe"``). ``timesteps``
        lists every network evaluation (one pipeline iteration each) as training indices ``N t - 1``;
        ``order`` is the solver's evaluations per step, so ``timesteps[t_start * order:]`` (img2img,
        inpainting) starts the solver at grid point ``t_start``, on the rest of the grid. The latents a
        pipeline hands to ``step`` are the solver's state at the start of each step (edits by callbacks
        are used); within a multi-evaluation step they enter through the model output, as in diffusers'
        own multistep correctors. Solver noise comes from the pipeline's ``generator`` (or a list).
        """

        order = 1
        config_name = "scheduler_config.json"  # type: ignore[assignment]  # diffusers declares it as `= None`
        _compatibles = [e.name for e in KarrasDiffusionSchedulers]

        @register_to_config
        def __init__(
            self,
            num_train_timesteps: int = 1000,
            beta_start: float = 0.0001,
            beta_end: float = 0.02,
            beta_schedule: str = "linear",
            trained_betas: list[float] | None = None,
            prediction_type: str = "epsilon",
            solver: str = "ddim",
            solver_options: dict[str, Any] | None = None,
            grid: str | None = None,  # a dpmlab grid name; None: timestep_spacing, else DEFAULT_GRID
            to_zero: bool = True,  # the last step lands on sigma = 0
            budget: str = "steps",  # what num_inference_steps counts: "steps" or "nfe"
            timestep_spacing: str | None = None,  # diffusers' linspace / leading / trailing
            steps_offset: int = 0,  # added to "leading" indices, as diffusers
            rescale_betas_zero_snr: bool = False,  # refused: alpha = 0 at the last index
            clip_sample: bool = False,  # clamp x0 to [-clip_sample_range, clip_sample_range]
            clip_sample_range: float = 1.0,
            thresholding: bool = False,  # dynamic thresholding of x0 (Imagen), as diffusers
            dynamic_thresholding_ratio: float = 0.995,
            sample_max_value: float = 1.0,
        ) -> None:
            if prediction_type not in ("epsilon", "sample", "v_prediction"):
                raise ValueError(f"unknown prediction_type {prediction_type!r}; allowed: epsilon, sample, v_prediction")
            if rescale_betas_zero_snr:
                raise ValueError(
                    "rescale_betas_zero_snr=True gives alpha = 0 (infinite log-SNR) at the last training index; "
                    "DPMLabScheduler does not support zero-terminal-SNR schedules"
                )
            if budget not in _BUDGETS:
                raise ValueError(f"unknown budget {budget!r}; allowed: {', '.join(_BUDGETS)}")
            if timestep_spacing is not None and timestep_spacing not in _SPACINGS:
                raise ValueError(f"unknown timestep_spacing {timestep_spacing!r}; allowed: {', '.join(_SPACINGS)}")
            if grid is not None and grid not in grids.GRIDS:
                raise ValueError(f"unknown grid {grid!r}; allowed: {', '.join(grids.GRIDS)}")
            if clip_sample and thresholding:
                raise ValueError("clip_sample=True and thresholding=True are exclusive; choose one")
            self.schedule = schedule_from_config(self.config)
            self.solver = get(solver, **(solver_options or {}))
            self.order = self.solver.nfe_for_steps(100, False) // 100  # evaluations per step (progress bars)
            self._threshold = (
                DynamicThreshold(_identity, ratio=dynamic_thresholding_ratio, s_max=sample_max_value)
                if thresholding
                else None
            )
            self.betas = self.schedule.betas.to(torch.float32)
            self.alphas = 1.0 - self.betas
            self.alphas_cumprod = self.schedule.alphas_cumprod.to(torch.float32)
            self.init_noise_sigma = 1.0  # VP: x_T has unit variance for unit-variance data, as diffusers
            self.timesteps = torch.zeros(0)
            self.num_inference_steps: int | None = None
            self._ts = torch.zeros(0, dtype=torch.float64)
            self._eval_t: list[float] = []
            self._begin_index: int | None = None
            self._thread: _StepThread | None = None
            self._k: int | None = None  # index into timesteps of the next step() call
            self._generator: Any = None
            self._run_ts = self._ts  # the grid the current run follows (a suffix of _ts)
            self._i = 0  # solver step index on _run_ts
            self._state: Any = None  # solver state after step _i - 1
            self._x_in = torch.zeros(0)  # the input of the running step
            self._t_req = 0.0  # time of the pending model request
            self._restartable = False  # the pending request is the step's first, at its input
            self._returned = torch.zeros(0)  # the latents handed back last

        # -- diffusers loader: reject options that would silently change the ODE or the grid --------
        @classmethod
        def extract_init_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
            # values another class left at its defaults are dropped by diffusers (ours apply): skip them
            defaults = set(config_dict.get("_use_default_values", []))
            merged = {**{k: v for k, v in config_dict.items() if k not in defaults}, **kwargs}
            for key, neutral in _NEUTRAL.items():
                if key in merged and merged[key] not in neutral:
                    hint = f"; use {_HINT[key]} instead" if key in _HINT else ""
                    raise ValueError(f"DPMLabScheduler does not support {key}={merged[key]!r}{hint}")
            return super().extract_init_dict(config_dict, **kwargs)

        @property
        def grid_name(self) -> str:
            """The dpmlab grid in use: ``grid``, else ``timestep_spacing``, else ``DEFAULT_GRID``."""
            return self.config["grid"] or self.config["timestep_spacing"] or DEFAULT_GRID  # type: ignore[no-any-return]

        def make_grid(self, steps: int) -> Tensor:
            """The continuous-time grid of ``steps`` solver steps."""
            to_zero = bool(self.config["to_zero"])
            if self.grid_name == "leading":
                final = 0.0 if to_zero else self.schedule.t_min
                return grids.leading(self.schedule, steps, steps_offset=int(self.config["steps_offset"]), final=final)
            return make_grid(self.schedule, self.grid_name, steps, to_zero=to_zero)

        def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
            n = num_inference_steps
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise ValueError(f"num_inference_steps must be a positive int, got {n!r}")
            steps = n if self.config["budget"] == "steps" else self.solver.steps_for_nfe(n, self.config["to_zero"])
            self._ts = self.make_grid(steps)
            self._eval_t = self._dry_run(self._ts)
            self.timesteps = self.schedule.t_to_index(f64(self._eval_t)).to(torch.float32)
            if device is not None:
                self.timesteps = self.timesteps.to(device)
            self.num_inference_steps = n
            self._begin_index = None
            self._reset()

        def _reset(self) -> None:
            if self._thread is not None:
                self._thread.stop()
            self._thread, self._k = None, None

        def _dry_run(self, ts: Tensor) -> list[float]:
            """The times at which the solver evaluates the model on ``ts``; refuses solvers whose times
            depend on the data (they would be fed other times than the pipeline's ``timesteps``)."""
            runs = []
            for scale in (0.5, -0.8):
                seen: list[float] = []

                def probe(x: Tensor, t: Tensor, scale: float = scale, seen: list[float] = seen, **c: Any) -> Tensor:
                    if not bool((t == t[0]).all()):
                        raise ValueError(f"solver {self.solver.name!r} evaluates per-sample times; diffusers cannot")
                    seen.append(float(t[0]))
                    return scale * x

                x = torch.randn(1, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
                for _ in iterate(Problem(probe, self.schedule), x, ts, self.solver):
                    pass
                runs.append(seen)
            if runs[0] != runs[1]:
                raise ValueError(
                    f"solver {self.solver.name!r} chooses its evaluation times from the data; a diffusers "
                    "pipeline fixes timesteps before sampling, so the network would see other times than the "
                    "solver uses; sample it with dpmlab.sample instead"
                )
            return runs[0]

        @property
        def begin_index(self) -> int | None:
            return self._begin_index

        @property
        def step_index(self) -> int | None:
            return self._k

        def set_begin_index(self, begin_index: int = 0) -> None:
            """Start at ``timesteps[begin_index]`` (img2img / inpainting): the solver then runs on the
            grid from that time on, exactly as ``dpmlab.solvers.sample`` on the shortened grid."""
            self._start_grid(begin_index)
            self._begin_index = begin_index
            self._reset()

        def _start_grid(self, b: int) -> Tensor:
            if self.num_inference_steps is None:
                raise ValueError("call set_timesteps(num_inference_steps) before set_begin_index / step")
            if not isinstance(b, int) or not 0 <= b < len(self._eval_t):
                raise ValueError(f"begin_index must be an int in [0, {len(self._eval_t)}), got {b!r}")
            if b == 0:
                return self._ts
            at = [j for j in range(len(self._ts) - 1) if abs(float(self._ts[j]) - self._eval_t[b]) < 1e-12]
            for j in at:
                if self._dry_run(self._ts[j:]) == self._eval_t[b:]:
                    return self._ts[j:]
            raise ValueError(
                f"solver {self.solver.name!r} cannot start at timesteps[{b}]: run from that grid point it "
                "evaluates the model at other times than timesteps[begin_index:] (a warm-up, or not the first "
                "evaluation of a step); use a solver without warm-up for img2img / inpainting"
            )

        def scale_model_input(self, sample: Tensor, timestep: Any = None) -> Tensor:
            return sample

        def _noise(self, stream: int, like: Tensor) -> Tensor:
            if self._generator is None:
                return torch.randn_like(like)
            return _generator_noise(self._generator, like)

        def _to_x0(self, out: Tensor, x: Tensor, t: float) -> Tensor:
            a = float(self.schedule.alpha(f64(t)))
            s = float(self.schedule.sigma(f64(t)))
            kind = self.config["prediction_type"]
            if kind == "sample":
                x0 = out
            elif kind == "epsilon":
                x0 = (x - s * out) / a
            else:
                x0 = (a * x - s * out) / (a * a + s * s)
            if self.config["clip_sample"]:
                r = float(self.config["clip_sample_range"])
                x0 = x0.clamp(-r, r)
            if self._threshold is not None:
                x0 = self._threshold.threshold(x0)
            return x0

        # -- the solver, one step per worker thread ----------------------------------------------
        def _launch(self, x: Tensor) -> tuple[str, Any]:
            """Start solver step ``self._i`` from ``x``; return its first request or its result."""
            ts, i, state = self._run_ts, self._i, self._state
            self._x_in = x

            def job(model: Any) -> tuple[Tensor, Any]:
                problem = Problem(model, self.schedule, noise=self._noise)
                st = self.solver.init(problem, x, ts) if i == 0 else state
                return self.solver.step(problem, x, ts, i, st)  # type: ignore[no-any-return]

            self._thread = _StepThread(job)
            return self._thread.next()

        def _advance(self, kind: str, value: Any) -> Tensor:
            """Follow the solver to its next model request (returned as the latents) or to the end."""
            while kind == _DONE:
                x_next, self._state = value
                self._i += 1
                if self._i == len(self._run_ts) - 1:
                    self._thread = None
                    return x_next  # type: ignore[no-any-return]
                kind, value = self._launch(x_next)
            x_req, t_req = value
            self._t_req = float(t_req[0])
            self._restartable = x_req is self._x_in or torch.equal(x_req, self._x_in)
            return x_req  # type: ignore[no-any-return]

        def step(
            self,
            model_output: Tensor,
            timestep: Any,
            sample: Tensor,
            generator: Any = None,
            return_dict: bool = True,
            eta: float = 0.0,
            **kwargs: Any,
        ) -> Any:
            if self.num_inference_steps is None:
                raise ValueError("call set_timesteps(num_inference_steps) before step()")
            if eta != 0.0:
                raise ValueError(f"eta={eta} is not a DPMLabScheduler step argument; set solver_options instead")
            if kwargs.get("use_clipped_model_output") is False:
                raise ValueError(
                    "use_clipped_model_output=False is not supported: dpmlab solvers see only the (clipped) x0"
                )
            self._generator = generator
            x = sample.to(state_dtype(sample.dtype))
            tv = float(timestep)
            if self._k is None:  # first call: begin at set_begin_index's point, else where `timestep` is
                b = self._begin_index
                if b is None:
                    hits = [k for k, v in enumerate(self.timesteps.tolist()) if abs(v - tv) < 1e-3]
                    if not hits:
                        raise ValueError(f"timestep {tv} is not one of this scheduler's timesteps")
                    b = hits[0]
                self._run_ts, self._k, self._i, self._state = self._start_grid(b), b, 0, None
                self._advance(*self._launch(x))
            elif self._thread is None:
                raise ValueError("step() called after the last evaluation; call set_timesteps() to sample again")
            elif self._restartable and not torch.equal(x, self._returned):
                # the pipeline changed the latents between steps: the step starts from its latents
                self._thread.stop()
                self._advance(*self._launch(x))
            expect = float(self.timesteps[self._k])
            if abs(tv - expect) > 1e-3:
                raise ValueError(f"step() got timestep {tv}, expected timesteps[{self._k}] = {expect}")
            assert self._thread is not None
            x0 = self._to_x0(model_output.to(x.dtype), x, self._t_req)
            prev = self._advance(*self._thread.answer(x0))
            self._k += 1
            self._returned = prev
            out = prev.to(sample.dtype)
            if not return_dict:
                return (out,)
            return SchedulerOutput(prev_sample=out)

        def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
            """``alpha x0 + sigma noise`` at training indices ``timesteps`` (one, or one per sample)."""
            t = self.schedule.index_to_t(f64(timesteps).cpu()).reshape(-1)
            if t.numel() == 1:
                t = t.expand(original_samples.shape[0])
            if t.numel() != original_samples.shape[0]:
                raise ValueError(f"got {t.numel()} timesteps for {original_samples.shape[0]} samples")
            out = self.schedule.add_noise(original_samples, noise, t.to(original_samples.device))
            return out.to(original_samples.dtype)

        def __len__(self) -> int:
            return self.config["num_train_timesteps"]  # type: ignore[no-any-return]

    DPMLabScheduler.__qualname__ = "DPMLabScheduler"
    return DPMLabScheduler


def __getattr__(name: str) -> Any:
    if name == "DPMLabScheduler":
        cls = _scheduler_class()
        globals()["DPMLabScheduler"] = cls
        return cls
    if name == "SchedulerMixin":  # diffusers' pipeline loader checks the component's module for it
        from diffusers.schedulers.scheduling_utils import SchedulerMixin

        return SchedulerMixin
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- diffusers models as dpmlab Denoisers ----------------------------------------------------------
