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


class _Abort(Exception):
    pass


class _SolverThread:
    """Runs a dpmlab solver in a worker thread whose model calls are handed to the caller.

    diffusers pipelines own the loop (``model_output = unet(x, t); x = scheduler.step(...)``) while
    dpmlab solvers call the model themselves. The handoff is strictly alternating, so the result is
    deterministic: each ``step`` answers the pending model request and returns the state at which the
    solver asks next (or the final sample)."""

    def __init__(self, problem_factory: Any, x: Tensor) -> None:
        import queue
        import threading

        self.requests: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.responses: queue.Queue[tuple[str, Any]] = queue.Queue()

        def model(xx: Tensor, t: Tensor, **cond: Any) -> Tensor:
            self.requests.put((_EVAL, (xx, t)))
            kind, value = self.responses.get()
            if kind == _STOP:
                raise _Abort
            return value

        def run() -> None:
            try:
                self.requests.put((_DONE, problem_factory(model, x)))
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


def _scheduler_class() -> type:
    try:
        from diffusers.configuration_utils import ConfigMixin, register_to_config
        from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput
    except ImportError as e:  # pragma: no cover - diffusers is a dev dependency
        raise ImportError("DPMLabScheduler needs diffusers (pip install diffusers)") from e

    from ..api import DEFAULT_GRID, make_grid
    from ..solvers.base import Problem, get
    from ..solvers.base import sample as run_solver

    class DPMLabScheduler(SchedulerMixin, ConfigMixin):  # type: ignore[misc]
        """A diffusers scheduler that runs any dpmlab solver.

        ``set_timesteps(n)`` takes ``n`` as the NFE budget (the pipeline's ``num_inference_steps``):
        ``timesteps`` then lists every network evaluation (one pipeline iteration each, like
        diffusers' Heun), as training-index times ``N t - 1``. The model output is read in the
        configured ``prediction_type``. Solver noise comes from the pipeline's ``generator``.
        """

        order = 1
        config_name = "scheduler_config.json"  # type: ignore[assignment]  # diffusers declares it as `= None`
        _compatibles: list[str] = []

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
            grid: str = DEFAULT_GRID,
            to_zero: bool = True,
        ) -> None:
            if prediction_type not in ("epsilon", "sample", "v_prediction"):
                raise ValueError(f"unknown prediction_type {prediction_type!r}; allowed: epsilon, sample, v_prediction")
            self.schedule = schedule_from_config(self.config)
            self.solver = get(solver, **(solver_options or {}))
            self.timesteps = torch.zeros(0)
            self.num_inference_steps: int | None = None
            self.init_noise_sigma = 1.0
            self._ts = torch.zeros(0, dtype=torch.float64)
            self._eval_t: list[float] = []
            self._run: _SolverThread | None = None
            self._pending_t: Tensor | None = None
            self._generator: torch.Generator | None = None

        def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
            steps = self.solver.steps_for_nfe(int(num_inference_steps), self.config["to_zero"])
            self._ts = make_grid(self.schedule, self.config["grid"], steps, to_zero=self.config["to_zero"])
            self._eval_t = self._dry_run(self._ts)
            self.timesteps = self.schedule.t_to_index(f64(self._eval_t)).to(torch.float32)
            if device is not None:
                self.timesteps = self.timesteps.to(device)
            self.num_inference_steps = int(num_inference_steps)
            self.init_noise_sigma = float(self.schedule.sigma(self._ts[:1]))
            if self._run is not None:
                self._run.stop()
            self._run = None

        def _dry_run(self, ts: Tensor) -> list[float]:
            seen: list[float] = []

            def probe(x: Tensor, t: Tensor, **cond: Any) -> Tensor:
                if not bool((t == t[0]).all()):
                    raise ValueError(f"solver {self.solver.name!r} evaluates per-sample times; diffusers cannot")
                seen.append(float(t[0]))
                return torch.zeros_like(x)

            run_solver(Problem(probe, self.schedule), torch.zeros(1, 1, dtype=torch.float64), ts, self.solver)
            return seen

        def scale_model_input(self, sample: Tensor, timestep: Any = None) -> Tensor:
            return sample

        def _noise(self, stream: int, like: Tensor) -> Tensor:
            return torch.randn(like.shape, generator=self._generator, dtype=like.dtype, device=like.device)

        def _to_x0(self, out: Tensor, x: Tensor, t: float) -> Tensor:
            a = float(self.schedule.alpha(f64(t)))
            s = float(self.schedule.sigma(f64(t)))
            kind = self.config["prediction_type"]
            if kind == "sample":
                return out
            if kind == "epsilon":
                return (x - s * out) / a
            return (a * x - s * out) / (a * a + s * s)

        def step(
            self,
            model_output: Tensor,
            timestep: Any,
            sample: Tensor,
            generator: torch.Generator | None = None,
            return_dict: bool = True,
            eta: float = 0.0,
            **kwargs: Any,
        ) -> Any:
            if self.num_inference_steps is None:
                raise ValueError("call set_timesteps(num_inference_steps) before step()")
            if eta != 0.0:
                raise ValueError(f"eta={eta} is not a DPMLabScheduler step argument; set solver_options instead")
            if kwargs.get("use_clipped_model_output"):
                raise ValueError("use_clipped_model_output is not supported; use a thresholding denoiser instead")
            self._generator = generator
            if self._run is None:  # first evaluation: start the solver at the pipeline's initial sample
                x_start = sample.to(torch.float32) if sample.dtype != torch.float64 else sample

                def factory(model: Any, x: Tensor) -> Tensor:
                    return run_solver(Problem(model, self.schedule, noise=self._noise), x, self._ts, self.solver)

                self._run = _SolverThread(factory, x_start)
                kind, value = self._run.next()
                if kind != _EVAL:
                    raise RuntimeError("solver finished without evaluating the model")
                self._pending_t = value[1]
            t = float(self._pending_t[0])  # type: ignore[index]
            x0 = self._to_x0(model_output.to(sample.dtype), sample, t)
            kind, value = self._run.answer(x0.to(torch.promote_types(sample.dtype, torch.float32)))
            if kind == _DONE:
                prev = value
                self._run = None
            else:
                prev, self._pending_t = value
            prev = prev.to(sample.dtype)
            if not return_dict:
                return (prev,)
            return SchedulerOutput(prev_sample=prev)

        def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
            t = self.schedule.index_to_t(f64(timesteps).cpu()).reshape(-1)
            if t.numel() == 1:
                t = t.expand(original_samples.shape[0])
            return self.schedule.add_noise(original_samples, noise, t.to(original_samples.device))

        def __len__(self) -> int:
            return self.config["num_train_timesteps"]

    return DPMLabScheduler


def __getattr__(name: str) -> Any:
    if name == "DPMLabScheduler":
        cls = _scheduler_class()
        globals()["DPMLabScheduler"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- diffusers models as dpmlab Denoisers ----------------------------------------------------------
_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def denoiser_from_diffusers(unet_or_pipeline: Any, scheduler_config: Mapping[str, Any] | None = None) -> Any:
    """A diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` (or a pipeline holding ``unet`` and
    ``scheduler``) as a dpmlab ``Denoiser``: the schedule and prediction type come from the scheduler
    config; the network is called with the training index ``N t - 1`` as its timestep, and
    conditioning keywords (e.g. ``encoder_hidden_states``) are passed through."""
    from ..models.denoiser import Denoiser

    unet = getattr(unet_or_pipeline, "unet", unet_or_pipeline)
    if scheduler_config is None:
        sched = getattr(unet_or_pipeline, "scheduler", None)
        if sched is None:
            raise ValueError("pass scheduler_config= (a diffusers scheduler config) with a bare UNet")
        scheduler_config = sched.config
    kind = scheduler_config.get("prediction_type", "epsilon")
    if kind not in _PREDICTIONS:
        raise ValueError(f"unsupported prediction_type {kind!r}; allowed: {', '.join(_PREDICTIONS)}")
    schedule = schedule_from_config(scheduler_config)

    def net(x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        return unet(x, t, **cond).sample

    cfg = unet.config
    size = cfg.sample_size
    hw = (size, size) if isinstance(size, int) else tuple(size)
    return Denoiser(net, schedule, _PREDICTIONS[kind], dtype=unet.dtype, data_shape=(cfg.in_channels, *hw))


def load_diffusers_folder(path: str | Any) -> Any:
    """Load a diffusers-format folder from disk (``unet/`` + ``scheduler/scheduler_config.json``, or a
    bare UNet folder next to a scheduler config) as a ``Denoiser``. Never downloads; weights must be
    safetensors (pickled ``.bin`` weights are refused)."""
    import json
    from pathlib import Path

    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder")
    unet_dir = root / "unet" if (root / "unet").is_dir() else root
    sched_file = next(
        (p for p in (root / "scheduler" / "scheduler_config.json", root / "scheduler_config.json") if p.is_file()), None
    )
    if sched_file is None:
        raise ValueError(f"no scheduler/scheduler_config.json under {root}")
    unet_cfg_file = unet_dir / "config.json"
    if not unet_cfg_file.is_file():
        raise ValueError(f"no UNet config.json in {unet_dir}")
    if not any(unet_dir.glob("*.safetensors")):
        raise ValueError(f"no .safetensors weights in {unet_dir}; pickled weights are not loaded")
    unet_cfg = json.loads(unet_cfg_file.read_text())
    import diffusers

    cls_name = unet_cfg.get("_class_name", "UNet2DModel")
    if cls_name not in ("UNet2DModel", "UNet2DConditionModel"):
        raise ValueError(f"unsupported model class {cls_name!r}; allowed: UNet2DModel, UNet2DConditionModel")
    unet = getattr(diffusers, cls_name).from_pretrained(unet_dir, local_files_only=True, use_safetensors=True)
    return denoiser_from_diffusers(unet.eval(), json.loads(sched_file.read_text()))
