"""SpeedUpNet (SUN) — Chai, Zheng, Cao, Chen, Wang & Ma (Ant Group), "SpeedUpNet: A Plug-and-Play Adapter
Network for Accelerating Text-to-Image Diffusion Models", ECCV 2024, arXiv 2312.08887. No public code (only a
project page): this file follows the paper's description; details its text does not fix are marked ASSUMPTION.

1. **Negative-positive offset adapter** (§3.2), a diffusers attention processor on every cross-attention layer
   (``attn2``) of a ``UNet2DConditionModel`` (``install``). With query ``q = W_q h`` and, per head (dim ``d``),

       Z+ = softmax(q (W_k c+)^T / sqrt d) W_v c+                 the frozen layer on the positive prompt c+
       Z- = softmax(q (W'_k c-)^T / sqrt d) W'_v c-               decoupled trainable K/V on the negative prompt c-
       Zn = Z- * |Z+| / (|Z-| + 1e-6)                              attention normalisation (per head and query)
       out = W_o (Z+ + gamma ⊙ (Z+ - Zn)) + b_o                   the offset, gamma one gain per channel

   ASSUMPTIONS: the normalisation matches the negative branch's per-token, per-head L2 norm to the positive
   branch's (the paper: it keeps the offset's scale consistent so it transfers across fine-tuned models); the
   offset is the normalised difference, so ``gamma = w - 1`` with ``W' = W`` is classifier-free guidance moved
   into attention space; ``W'_k, W'_v`` start as copies of the layer's ``W_k, W_v`` and ``gamma`` at
   ``gain_init`` (default 0: the fresh adapter is exactly the base UNet, tested bit for bit; the shipped recipe
   starts at 2, attention-space guidance, because a run from 0 moved gamma too slowly on CPU). The negative
   prompt's text states travel concatenated after the positive ones in ``encoder_hidden_states`` (as IP-Adapter
   passes image tokens):
   ``(B, 2L, D)`` uses the adapter, ``(B, L, D)`` is the plain layer (the teacher runs through the same UNet).
2. **Distillation with the multi-step consistency (MSC) loss** (§3.3; ``SpeedUpNetObjective`` on ``fit``).
   Teacher: the frozen base with CFG at scale ``w`` against the negative prompt, DPM-Solver++(2M) on
   ``teacher_steps`` steps (2 UNet evaluations per step). Student: base + adapter, no CFG, DDIM (= first-order
   DPM-Solver++) on ``student_steps`` steps of the same grid, each student interval ``[t_i, t_{i+1}]`` holding
   ``m = teacher_steps / student_steps`` teacher steps. A training step draws one interval ``i``, runs the
   current student (no gradient) from noise to ``x_{t_i}``, the teacher's ``m`` steps from there to
   ``x*_{t_{i+1}}`` (``teacher_segment``), and the student's one step to ``x_{t_{i+1}}``:

       L_MSC = E || (x_{t_{i+1}} - x*_{t_{i+1}}) / (alpha_{i+1} (1 - e^{-h_i})) ||^2,  h_i = lam_{i+1} - lam_i,

   i.e. the squared error of the student's x0-prediction against the x0 that would put its DDIM step exactly on
   the teacher's trajectory (``msc_loss``). ASSUMPTIONS: intervals drawn uniformly, the start state from the
   student's own few-step trajectory (the same distribution it meets at inference), the teacher restarted per
   interval (its first sub-step first order), x0 units so that all intervals weigh alike, no other loss term.
   Prompts: the training captions (``captions.draw_caption_ids``) of the examples; negatives drawn uniformly
   from ``negatives`` (the empty one = plain CFG).

The adapter file is small (``W'_k, W'_v, gamma`` per layer, safetensors, format ``dpmlab.method/1`` with the
layer names and shapes in its header) and installs into any UNet whose cross-attention layers have the same
names and shapes (``install(unet, "runs/speedupnet/model.safetensors")``): the paper's plug-and-play.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._utils import atomic_write, dataclass_from_dict, f64
from ..api import sample as api_sample
from ..models.guidance import classifier_free, with_cond
from ..models.hub import CHECKPOINT_FORMAT, write_safetensors
from ..models.hub import load as load_model
from ..models.t2i import TextToImage
from ..schedules import NoiseSchedule
from ..solvers.base import Problem, Solver, get
from ..solvers.base import sample as run
from ..solvers.differentiable import sample_with_grad
from ..timesteps import DISCRETE_GRIDS, GRIDS, make_grid
from ..training.captions import CAPTIONS, draw_caption_ids, slant_class, thickness_class
from ..training.data import Dataset
from . import METHOD_FORMAT, Method, MethodRecipe, register_method, save_method_model

__all__ = [
    "SpeedUpNet",
    "SpeedUpNetAdapter",
    "SpeedUpNetProcessor",
    "SpeedUpNetDenoiser",
    "SpeedUpNetObjective",
    "SpeedUpNetModel",
    "cross_attention_layers",
    "install",
    "uninstall",
    "load_adapter",
    "save_adapter",
    "teacher_segment",
    "msc_loss",
    "NEGATIVES",
]

NEGATIVES = ("", "thin", "bold", "left slanted", "right slanted", "slanted", "upright")  # mnist_t2i attribute words
EPS = 1e-6  # attention normalisation: |Z-| + EPS
STUDENT_SOLVER = "ddim"  # the student's step (first-order DPM-Solver++), one evaluation per step


# --- the adapter -------------------------------------------------------------------------------------
class SpeedUpNetLayer(nn.Module):
    """One cross-attention layer's adapter: ``to_k``, ``to_v`` (cross_dim -> inner_dim) and ``gamma`` (inner_dim,)."""

    def __init__(self, cross_dim: int, inner_dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_k = nn.Linear(cross_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(cross_dim, inner_dim, bias=False)
        self.gamma = nn.Parameter(torch.zeros(inner_dim))  # 0: the offset vanishes, the layer is the base layer


class SpeedUpNetAdapter(nn.Module):
    """The adapters of a UNet's cross-attention layers ``names`` (module paths), each ``(cross_dim, inner_dim,
    heads)``, for text states of ``context_length`` tokens."""

    def __init__(self, layers: Mapping[str, Sequence[int]], context_length: int) -> None:
        super().__init__()
        if not layers:
            raise ValueError("a SpeedUpNet adapter needs at least one cross-attention layer, got none")
        if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 1:
            raise ValueError(f"context_length must be a positive int, got {context_length!r}")
        self.names = list(layers)
        self.shapes = {n: tuple(int(v) for v in s) for n, s in layers.items()}
        self.context_length = context_length
        self.layers = nn.ModuleList([SpeedUpNetLayer(*self.shapes[n]) for n in self.names])

    @classmethod
    def for_unet(cls, unet: nn.Module, context_length: int, gain: float = 0.0) -> SpeedUpNetAdapter:
        """A fresh adapter for ``unet``: ``W'_k, W'_v`` copied from each layer's ``W_k, W_v``, ``gamma = gain``
        (0: exactly the base UNet; ``w - 1``: classifier-free guidance moved into attention space)."""
        adapter = cls(cross_attention_layers(unet), context_length)
        layers: list[Any] = list(adapter.layers)
        with torch.no_grad():
            for name, layer in zip(adapter.names, layers, strict=True):
                attn: Any = unet.get_submodule(name)
                layer.to_k.weight.copy_(attn.to_k.weight)
                layer.to_v.weight.copy_(attn.to_v.weight)
                layer.gamma.fill_(gain)
        return adapter

    def info(self) -> dict[str, Any]:
        return {"layers": [[n, *self.shapes[n]] for n in self.names], "context_length": self.context_length}

    @classmethod
    def from_info(cls, info: Mapping[str, Any]) -> SpeedUpNetAdapter:
        return cls({row[0]: row[1:] for row in info["layers"]}, int(info["context_length"]))


def cross_attention_layers(unet: nn.Module) -> dict[str, tuple[int, int, int]]:
    """``{module path: (cross_dim, inner_dim, heads)}`` of the cross-attention layers of a diffusers UNet, in the
    order of its ``attn_processors``; ``ValueError`` for a layer this processor cannot run."""
    procs = getattr(unet, "attn_processors", None)
    if not isinstance(procs, dict):
        raise ValueError(f"SpeedUpNet needs a diffusers UNet with attention processors, got {type(unet).__name__}")
    out = {}
    for key in procs:
        name = key.removesuffix(".processor")
        attn: Any = unet.get_submodule(name)
        if not getattr(attn, "is_cross_attention", False):
            continue
        extras = [a for a in ("spatial_norm", "group_norm", "norm_q", "norm_k") if getattr(attn, a, None) is not None]
        if extras or attn.norm_cross or attn.residual_connection:
            raise ValueError(
                f"cross-attention layer {name} uses {extras or 'norm_cross/residual_connection'}; "
                "SpeedUpNet supports Stable Diffusion's plain cross-attention only"
            )
        out[name] = (int(attn.to_k.in_features), int(attn.to_k.out_features), int(attn.heads))
    if not out:
        raise ValueError(f"{type(unet).__name__} has no cross-attention layers")
    return out


class SpeedUpNetProcessor:
    """The diffusers attention processor of one cross-attention layer with its adapter (module docstring, 1).
    A plain object, not a module: the adapter's parameters stay out of the UNet's ``state_dict``."""

    def __init__(self, layer: SpeedUpNetLayer, context_length: int, base: Any) -> None:
        self.layer, self.context_length, self.base = layer, context_length, base  # base: the replaced processor

    def __call__(
        self,
        attn: Any,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        n, length = hidden_states.shape[0], self.context_length
        if encoder_hidden_states is None or encoder_hidden_states.shape[1] not in (length, 2 * length):
            got = None if encoder_hidden_states is None else tuple(encoder_hidden_states.shape)
            raise ValueError(
                f"SpeedUpNet cross-attention takes text states of {length} (positive) or {2 * length} "
                f"(positive + negative) tokens, got {got}"
            )
        if attention_mask is not None:
            raise ValueError("SpeedUpNet cross-attention does not take an attention mask")
        pos = encoder_hidden_states[:, :length]
        heads = attn.heads

        def split(z: Tensor) -> Tensor:  # (B, T, heads * d) -> (B, heads, T, d)
            return z.view(n, -1, heads, z.shape[-1] // heads).transpose(1, 2)

        q = split(attn.to_q(hidden_states))
        z = F.scaled_dot_product_attention(q, split(attn.to_k(pos)), split(attn.to_v(pos)), dropout_p=0.0)  # Z+
        out = z.transpose(1, 2).reshape(n, -1, z.shape[1] * z.shape[-1]).to(q.dtype)  # (B, N, inner)
        if encoder_hidden_states.shape[1] == 2 * length:
            neg, lay = encoder_hidden_states[:, length:], self.layer
            zm = F.scaled_dot_product_attention(q, split(lay.to_k(neg)), split(lay.to_v(neg)), dropout_p=0.0)  # Z-
            zn = zm * (z.norm(dim=-1, keepdim=True) / (zm.norm(dim=-1, keepdim=True) + EPS))  # normalisation
            out = out + lay.gamma * (z - zn).transpose(1, 2).reshape(out.shape).to(q.dtype)  # + the offset
        out = attn.to_out[1](attn.to_out[0](out))  # output projection, dropout
        return out / attn.rescale_output_factor  # type: ignore[no-any-return]


def install(unet: nn.Module, adapter: SpeedUpNetAdapter | str | Path) -> SpeedUpNetAdapter:
    """Install ``adapter`` (or the adapter file at that path) on ``unet``'s cross-attention layers (in place)
    and freeze ``unet``; ``ValueError`` unless its layer names and shapes match. Returns the adapter."""
    if not isinstance(adapter, SpeedUpNetAdapter):
        adapter = load_adapter(adapter)
    have = cross_attention_layers(unet)
    want = adapter.shapes
    if have != want:
        diff = sorted(set(have) ^ set(want)) + [n for n in have if n in want and have[n] != want[n]]
        raise ValueError(
            f"the adapter does not fit this UNet: cross-attention layers (cross_dim, inner_dim, heads) "
            f"differ at {', '.join(diff[:3])}{' ...' if len(diff) > 3 else ''} (UNet "
            f"{have.get(diff[0])}, adapter {want.get(diff[0])})"
        )
    uninstall(unet)
    procs = dict(unet.attn_processors)  # type: ignore[arg-type]
    for name, layer in zip(adapter.names, adapter.layers, strict=True):
        key = f"{name}.processor"
        procs[key] = SpeedUpNetProcessor(layer, adapter.context_length, procs[key])  # type: ignore[arg-type]
    unet.set_attn_processor(procs)  # type: ignore[operator]
    unet.requires_grad_(False)
    return adapter


def uninstall(unet: nn.Module) -> None:
    """Put back the processors ``install`` replaced (nothing happens without an installed adapter)."""
    procs = dict(unet.attn_processors)  # type: ignore[arg-type]
    if any(isinstance(p, SpeedUpNetProcessor) for p in procs.values()):
        unet.set_attn_processor(
            {
                k: p.base if isinstance(p, SpeedUpNetProcessor) else p  # type: ignore[operator]
                for k, p in procs.items()
            }
        )


def load_adapter(path: str | Path) -> SpeedUpNetAdapter:
    """The adapter of a SpeedUpNet run folder, model file or checkpoint (no base model is loaded)."""
    from safetensors import safe_open

    p = Path(path)
    if p.is_dir():
        p = p / "model.safetensors" if (p / "model.safetensors").is_file() else p / "checkpoint.safetensors"
    if not p.is_file():
        raise ValueError(f"{p}: no such SpeedUpNet adapter file or run folder")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        info = json.loads(meta.get("method", "{}"))
    except Exception as e:
        raise ValueError(f"{p}: not a readable adapter file ({type(e).__name__}: {e})") from None
    if not isinstance(info, dict) or info.get("name") != "speedupnet" or "adapter" not in info:
        name = info.get("name") if isinstance(info, dict) else None
        raise ValueError(f"{p}: not a SpeedUpNet adapter (method {name!r})")
    if meta.get("format") == CHECKPOINT_FORMAT:
        tensors = {k[len("ema/") :]: v for k, v in tensors.items() if k.startswith("ema/")}
    return _adapter_from(info, tensors, p)


def save_adapter(
    path: str | Path,
    adapter: SpeedUpNetAdapter,
    settings: SpeedUpNet | None = None,
    card: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``adapter`` as safetensors (format ``METHOD_FORMAT``, the layers in the header) + a JSON card
    beside it; ``load_adapter`` / ``install`` / ``dpmlab.methods.load`` read it."""
    info = {
        "name": "speedupnet",
        "settings": (settings or SpeedUpNet()).to_dict(),
        "adapter": adapter.info(),
        "parameters": sum(p.numel() for p in adapter.parameters()),
    }
    p = Path(path)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in adapter.state_dict().items()}
    write_safetensors(p, tensors, {"format": METHOD_FORMAT, "method": json.dumps(info)})
    with atomic_write(p.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps({**dict(card or {}), "method": info, "weights": p.name}, indent=2) + "\n")
    return p


def _adapter_from(info: Mapping[str, Any], tensors: Mapping[str, Tensor], path: Path) -> SpeedUpNetAdapter:
    adapter = SpeedUpNetAdapter.from_info(info["adapter"])
    want = {k: tuple(v.shape) for k, v in adapter.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if want != got:
        raise ValueError(
            f"{path}: adapter tensors {sorted(set(got) ^ set(want))[:3] or 'shapes'} do not match its header's layers"
        )
    adapter.load_state_dict({k: v.float() for k, v in tensors.items()})
    return adapter.eval().requires_grad_(False)


# --- the student and the loss ----------------------------------------------------------------------------
class SpeedUpNetDenoiser:
    """The student: ``model`` (a ``TextToImage`` with the adapter installed) in ONE evaluation per step, the
    negative prompt through the adapter. Conditioning: ``prompt=`` / ``negative_prompt=`` (strings or one per
    sample) or ``encoder_hidden_states=`` / ``negative_hidden_states=`` ``(B, L, D)``."""

    KEYS = ("prompt", "negative_prompt", "encoder_hidden_states", "negative_hidden_states")

    def __init__(self, model: TextToImage) -> None:
        self.model, self.schedule, self.data_shape = model, model.schedule, model.data_shape

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        unknown = sorted(set(cond) - set(self.KEYS))
        if unknown:
            raise ValueError(
                f"SpeedUpNet student conditioning {', '.join(unknown)} unknown; allowed: {', '.join(self.KEYS)}"
            )
        b, pos, neg = x.shape[0], cond.get("encoder_hidden_states"), cond.get("negative_hidden_states")
        if pos is None:
            pos = self.model.encode_prompt(cond.get("prompt") or "", b)
        if neg is None:
            neg = self.model.encode_prompt(cond.get("negative_prompt", ""), b)
        return self.model(x, t, encoder_hidden_states=torch.cat([pos, neg.to(pos)], 1))  # type: ignore[no-any-return]


def teacher_segment(
    teacher: Any, schedule: NoiseSchedule, x: Tensor, ts: Tensor, solver: Solver[Any], cond: Mapping[str, Any]
) -> Tensor:
    """The teacher's trajectory from ``x`` at ``ts[0]`` to ``ts[-1]`` (``solver`` restarted at ``ts[0]``)."""
    with torch.no_grad():
        return run(Problem(teacher, schedule, cond=dict(cond)), x, ts, solver)


def msc_loss(x_next: Tensor, target: Tensor, schedule: NoiseSchedule, t: float, t_next: float) -> Tensor:
    """``mean(((x_next - target) / (alpha(t_next) (1 - exp(-h))))^2)``, ``h = lam(t_next) - lam(t)``: the
    squared distance of the student's DDIM step ``x_next`` to the teacher's ``target`` in x0 units."""
    if x_next.shape != target.shape:
        raise ValueError(f"student and teacher states differ in shape: {tuple(x_next.shape)} vs {tuple(target.shape)}")
    tt = f64([t, t_next])
    if not tt[1] < tt[0]:
        raise ValueError(f"t_next must be below t, got t={t}, t_next={t_next}")
    lam = schedule.lam(tt)
    c = float(schedule.alpha(tt[1:]) * -torch.expm1(-(lam[1] - lam[0])))
    return ((x_next - target) / c).square().mean()


# --- settings, objective, model ---------------------------------------------------------------------------
@dataclass(frozen=True)
class SpeedUpNet:
    """SpeedUpNet settings (a method recipe's ``method`` section)."""

    base: str = "mnist_t2i"  # the text-to-image model: a dpmlab.load name or a diffusers folder
    guidance: float = 5.0  # the teacher's CFG scale w (diffusers' guidance_scale)
    teacher_steps: int = 20  # teacher DPM-Solver++ steps over the whole grid (2 UNet evaluations each)
    student_steps: int = 4  # student steps = NFE (1 evaluation each)
    teacher_solver: str = "dpm_solver_pp"  # a deterministic registered solver
    grid: str = "quadratic_time"  # a continuous named grid (nested: the student's is every m-th teacher time)
    negatives: tuple[str, ...] = NEGATIVES  # negative prompts drawn uniformly in training
    gain_init: float = 0.0  # initial gamma (0: the fresh adapter is the base UNet)

    def __post_init__(self) -> None:
        object.__setattr__(self, "negatives", tuple(self.negatives))
        for name in ("teacher_steps", "student_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"SpeedUpNet {name} must be a positive int, got {v!r}")
        if self.teacher_steps % self.student_steps or self.teacher_steps == self.student_steps:
            raise ValueError(
                f"SpeedUpNet teacher_steps ({self.teacher_steps}) must be a multiple > 1 of "
                f"student_steps ({self.student_steps})"
            )
        if not self.guidance >= 1.0:
            raise ValueError(f"SpeedUpNet guidance must be >= 1, got {self.guidance!r}")
        if self.grid not in GRIDS or self.grid in DISCRETE_GRIDS:
            allowed = ", ".join(g for g in GRIDS if g not in DISCRETE_GRIDS)
            raise ValueError(f"SpeedUpNet grid must be a continuous named grid ({allowed}), got {self.grid!r}")
        if get(self.teacher_solver).is_stochastic():
            raise ValueError(f"SpeedUpNet's teacher solver must be deterministic; {self.teacher_solver!r} is not")
        if not self.negatives or not all(isinstance(p, str) for p in self.negatives):
            raise ValueError(f"SpeedUpNet negatives must be a non-empty list of strings, got {self.negatives!r}")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "negatives": list(self.negatives)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SpeedUpNet:
        return dataclass_from_dict(cls, d, what="SpeedUpNet method", tuple_fields=("negatives",))


def _load_t2i(base: str) -> TextToImage:
    model = load_model(base)
    if not isinstance(model, TextToImage):
        raise ValueError(f"SpeedUpNet accelerates a text-to-image model; {base!r} loads as {type(model).__name__}")
    return model


def grids(model: TextToImage, s: SpeedUpNet) -> tuple[Tensor, Tensor]:
    """(student grid, teacher grid); ``ValueError`` unless the student's times are every m-th teacher time."""
    ts = make_grid(model.schedule, s.grid, s.student_steps)
    ts_teacher = make_grid(model.schedule, s.grid, s.teacher_steps)
    if not torch.allclose(ts_teacher[:: s.teacher_steps // s.student_steps], ts, rtol=0, atol=1e-9):
        raise ValueError(
            f"grid {s.grid!r} is not nested: its {s.student_steps}-step times are not every "
            f"{s.teacher_steps // s.student_steps}-th of its {s.teacher_steps}-step times"
        )
    return ts, ts_teacher


class SpeedUpNetObjective:
    """MSC distillation of the base model's CFG teacher into base + adapter (only the adapter trains)."""

    def __init__(self, recipe: MethodRecipe, dataset: Dataset) -> None:
        s: SpeedUpNet = recipe.settings
        self.recipe, self.settings, self.dataset, self.name = recipe, s, dataset, recipe.name
        if dataset.labels is None or tuple(dataset.shape) not in ((1, 28, 28), (1, 32, 32)):
            raise ValueError(
                f"SpeedUpNet draws its prompts from labelled MNIST images; data {dataset.name!r} has "
                f"shape {dataset.shape} and {'no ' if dataset.labels is None else ''}labels"
            )
        self.model = _load_t2i(s.base)
        for p in s.negatives:
            if p:
                self.model.check_prompt(p)
        self.ts, self.ts_teacher = grids(self.model, s)
        self.m = s.teacher_steps // s.student_steps
        with torch.no_grad():
            self.attrs = torch.stack(
                [dataset.labels, thickness_class(dataset.x, dataset.labels), slant_class(dataset.x)], 1
            )
            self.pos_states = self.model.encode_prompt(list(CAPTIONS))  # (len(CAPTIONS), L, D)
            self.neg_states = self.model.encode_prompt(list(s.negatives))
        torch.manual_seed(recipe.train.seed)
        self.module: nn.Module = SpeedUpNetAdapter.for_unet(
            self.model.unet, self.model.tokenizer.model_max_length, s.gain_init
        )
        install(self.model.unet, self.module)  # type: ignore[arg-type]
        self.module.requires_grad_(True)
        self.student = SpeedUpNetDenoiser(self.model)
        self.student_solver, self.teacher_solver = get(STUDENT_SOLVER), get(s.teacher_solver)

    def __len__(self) -> int:
        return len(self.dataset)

    def config(self) -> dict[str, Any]:
        return self.recipe.config()

    def draw(self, idx: Tensor, g: torch.Generator) -> dict[str, Tensor]:
        """``caption``/``negative`` ids, the starting noise ``z`` and the interval (one per step, repeated)."""
        b = len(idx)
        return {
            "caption": draw_caption_ids(self.attrs[idx], g),
            "negative": torch.randint(0, len(self.settings.negatives), (b,), generator=g),
            "z": torch.randn((b, *self.model.data_shape), generator=g),  # type: ignore[misc]
            "segment": torch.randint(0, self.settings.student_steps, (1,), generator=g).expand(b),
        }

    def loss(self, module: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        i, sch = int(batch["segment"][0]), self.model.schedule
        pos = self.pos_states[batch["caption"].cpu()].to(batch["z"].device)
        neg = self.neg_states[batch["negative"].cpu()].to(batch["z"].device)
        student = Problem(self.student, sch, cond={"encoder_hidden_states": pos, "negative_hidden_states": neg})
        x = float(sch.sigma(self.ts[:1])) * batch["z"]
        if i:  # the student's own few-step trajectory to t_i
            with torch.no_grad():
                x = run(student, x, self.ts[: i + 1], self.student_solver)
        teacher = classifier_free(self.model, with_cond(self.model, encoder_hidden_states=neg), self.settings.guidance)
        target = teacher_segment(
            teacher,
            sch,
            x,
            self.ts_teacher[i * self.m : (i + 1) * self.m + 1],
            self.teacher_solver,
            {"encoder_hidden_states": pos},
        )
        x_next = sample_with_grad(student, x, self.ts[i : i + 2], self.student_solver)
        return msc_loss(x_next, target, sch, float(self.ts[i]), float(self.ts[i + 1]))

    def _info(self) -> dict[str, Any]:
        a: SpeedUpNetAdapter = self.module  # type: ignore[assignment]
        return {
            "name": "speedupnet",
            "settings": self.settings.to_dict(),
            "adapter": a.info(),
            "parameters": sum(p.numel() for p in a.parameters()),
            "base_parameters": sum(p.numel() for p in self.model.unet.parameters()),
        }

    def export(self, ema: nn.Module, out_dir: Path, card: dict[str, Any]) -> Path:
        s = self.settings
        weights = str(Path(out_dir) / "model.safetensors")
        return save_method_model(
            out_dir,
            ema,
            self._info(),
            self.recipe,
            self.dataset,
            {
                **card,
                "nfe": {"student": s.student_steps, "teacher": 2 * s.teacher_steps},
                "install_with": f"dpmlab.methods.speedupnet.install(unet, {weights!r})",
            },
        )

    def checkpoint_meta(self) -> dict[str, str]:
        return {"method": json.dumps(self._info())}


@dataclass(frozen=True)
class SpeedUpNetModel:
    """The base text-to-image ``model`` with the trained ``adapter`` installed; ``sample`` draws the student."""

    model: TextToImage
    adapter: SpeedUpNetAdapter
    settings: SpeedUpNet

    @property
    def denoiser(self) -> SpeedUpNetDenoiser:
        return SpeedUpNetDenoiser(self.model)

    def sample(
        self,
        n: int = 16,
        *,
        prompt: str | Sequence[str] = "",
        negative_prompt: str | Sequence[str] = "",
        nfe: int | None = None,
        seed: int = 0,
        grid: str | None = None,
        batch_size: int | None = None,
    ) -> Tensor:
        """``n`` latents (``self.model.decode`` gives images) from the student: DDIM, ``nfe`` steps of ONE
        evaluation each (default: the trained ``student_steps``), no CFG, the negative prompt via the adapter."""
        return api_sample(
            self.denoiser,
            n,
            solver=STUDENT_SOLVER,
            nfe=nfe or self.settings.student_steps,
            grid=grid or self.settings.grid,
            seed=seed,
            batch_size=batch_size,
            cond={"prompt": prompt, "negative_prompt": negative_prompt},
        )

    @classmethod
    def from_file(cls, path: Path, info: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> SpeedUpNetModel:
        settings = SpeedUpNet.from_dict(info["settings"])
        adapter = _adapter_from(info, tensors, path)
        model = _load_t2i(settings.base)
        install(model.unet, adapter)
        return cls(model, adapter, settings)


register_method(Method("speedupnet", SpeedUpNet, SpeedUpNetObjective, SpeedUpNetModel.from_file, kind="distill"))
