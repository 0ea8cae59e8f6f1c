"""One conditioning value for class labels and text: what a conditional model receives besides (x, t).

Every course model (2D MLPs, the digits UNet, the mini Stable Diffusion, SD 1.5, every student) is called the same way:

    model(x, t, cond=None) -> Pred          cond: a Cond, or None (unconditional)

Samplers, `steps.*` and `samplers.generate` take `cond=` and pass it to every model call (k-diffusion's extra_args).
Class labels are wrapped where the data is made: `labels(y, num_classes)` = Cond(y=y, null_y=num_classes); a bare
label tensor at the model boundary is a TypeError (`check`).

    Cond(y=labels, null_y=num_classes)                       a class-conditional model (the 2D and digit teachers)
    Cond(text=emb, null_text=empty_prompt_emb)               Stable Diffusion (encoder_hidden_states, sd.py)
    Cond(..., w=w)                                           a guided student's guidance weight input (Meng et al. 2023)
    Cond(..., timestep_cond=emb)                             LCM's w-embedding (UNet2DConditionModel.time_cond_proj_dim)
    Cond(..., s=s)                                           a flow map's end time: X(x_t, t -> s) (`with_end_time`)

Every batched field is batch-first with one batch size B. A Cond knows its null value (what classifier-free
guidance compares against, Ho & Salimans 2022), so guidance (`guidance.cfg`) and label/prompt dropout during
training (`Cond.drop`, used by `losses.denoising_loss`) are written once for labels and text alike:

    null():  y -> null_y,  text -> null_text,  pooled -> null_pooled  (broadcast to B);  w, timestep_cond, s unchanged
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

BATCHED = ("y", "text", "pooled", "w", "timestep_cond", "s")  # batch-first fields, sliced and concatenated
NULLS = {"y": "null_y", "text": "null_text", "pooled": "null_pooled"}   # field -> its null value


@dataclass(frozen=True)
class Cond:
    """One conditioning value; every field optional, batched fields batch-first with one batch size B."""

    y: Tensor | None = None              # (B,) class labels
    text: Tensor | None = None           # (B, L, D) text embeddings (encoder_hidden_states)
    pooled: Tensor | None = None         # (B, D) pooled text embedding
    w: Tensor | None = None              # (B,) guidance weight as a model input (guided students, LCM)
    timestep_cond: Tensor | None = None  # (B, D) LCM's w-embedding for UNet2DConditionModel(time_cond_proj_dim)
    s: Tensor | None = None              # (B,) the end time of a flow map X(x_t, t -> s) (a flow-map model reads it)
    null_y: int | None = None            # the null label (the model's num_classes)
    null_text: Tensor | None = None      # (1, L, D) empty-prompt embedding
    null_pooled: Tensor | None = None    # (1, D) pooled embedding of the empty prompt

    def __post_init__(self) -> None:
        sizes = {name: getattr(self, name).shape[0] for name in BATCHED
                 if getattr(self, name) is not None and getattr(self, name).ndim > 0}
        for name in ("w", "s"):
            if isinstance(getattr(self, name), Tensor) and getattr(self, name).ndim == 0:
                raise ValueError(f"Cond.{name} is per sample, shape (B,): pass {name}.expand(B) (or "
                                 f"torch.full((B,), {name}))")
        if len(set(sizes.values())) > 1:
            raise ValueError(f"the fields of a Cond must share one batch size; got {sizes}")
        for name in ("y", "w", "s"):
            v = getattr(self, name)
            if v is not None and v.ndim != 1:
                raise ValueError(f"Cond.{name} has shape (B,); got {tuple(v.shape)}")
        for name, null in (("null_text", self.null_text), ("null_pooled", self.null_pooled)):
            if null is not None and null.shape[0] != 1:
                raise ValueError(f"Cond.{name} is one embedding with a leading 1, shape (1, ...); got "
                                 f"{tuple(null.shape)}")

    # ------------------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        for name in BATCHED:
            v = getattr(self, name)
            if v is not None:
                return int(v.shape[0])
        raise ValueError("this Cond holds no batched field (y, text, pooled, w, timestep_cond or s), so it has "
                         "no batch size")

    def __getitem__(self, index: int | slice | Tensor) -> "Cond":
        """The samples `index` selects (a slice, an index tensor or a boolean mask); an int keeps a batch of 1."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return replace(self, **{name: getattr(self, name)[index] for name in BATCHED if getattr(self, name) is not None})

    def null(self) -> "Cond":
        """The same batch with every label and prompt replaced by its null value (the unconditional input of
        classifier-free guidance); w, timestep_cond and s are unchanged."""
        out = {}
        for name, null_name in NULLS.items():
            v, null = getattr(self, name), getattr(self, null_name)
            if v is None:
                continue
            if null is None:
                raise ValueError(f"this Cond has {name} but no {null_name}: classifier-free guidance and dropout "
                                 f"need the null value (null_y = the model's num_classes; null_text = the "
                                 f"embedding of the empty prompt \"\", as sd.TextEncoder returns it)")
            if name == "y":
                out[name] = torch.full_like(v, int(null))
            else:
                if null.shape[1:] != v.shape[1:]:
                    raise ValueError(f"Cond.{null_name} has shape {tuple(null.shape)}, but {name} is "
                                     f"{tuple(v.shape)}: encode both with the same tokenizer and max_length")
                out[name] = null.to(device=v.device, dtype=v.dtype).expand_as(v)
        return replace(self, **out)

    def drop(self, p: float, generator: torch.Generator) -> "Cond":
        """Each sample replaced by its null value with probability p (classifier-free guidance training,
        Ho & Salimans 2022): ONE uniform draw per sample, torch.rand(B, generator) < p, on the generator's device.
        p <= 0 returns self without drawing."""
        if p <= 0:
            return self
        n = len(self)
        drop = torch.rand(n, generator=generator, device=generator.device) < p          # (B,)
        null = self.null()
        out = {}
        for name in NULLS:
            v = getattr(self, name)
            if v is not None:
                mask = drop.to(v.device).reshape(-1, *([1] * (v.ndim - 1)))
                out[name] = torch.where(mask, getattr(null, name), v)
        return replace(self, **out)

    @staticmethod
    def cat(conds: Sequence["Cond"]) -> "Cond":
        """Concatenate along the batch. All parts must hold the same fields and the same null values."""
        conds = list(conds)
        if not conds:
            raise ValueError("Cond.cat needs at least one Cond")
        first = conds[0]
        for c in conds[1:]:
            have = [n for n in BATCHED if getattr(first, n) is not None]
            other = [n for n in BATCHED if getattr(c, n) is not None]
            if have != other:
                raise ValueError(f"Cond.cat: the parts hold different fields ({have} and {other})")
            for name in NULLS.values():
                a, b = getattr(first, name), getattr(c, name)
                same = (a is b) or (a is not None and b is not None and
                                    (a == b if isinstance(a, int) else
                                     a.shape == b.shape and bool(torch.equal(a, b.to(a)))))
                if not same:
                    raise ValueError(f"Cond.cat: the parts have different {name}")
        return replace(first, **{name: torch.cat([getattr(c, name) for c in conds])
                                 for name in BATCHED if getattr(first, name) is not None})

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Cond":
        """Move every tensor to `device`; cast the floating ones (text, pooled, w, timestep_cond, nulls) to
        `dtype`. Labels stay integers; the end time s stays float32 or wider (a time, like t)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                cast = dtype if (dtype is not None and v.is_floating_point()) else None
                if cast is not None and f.name == "s":
                    cast = torch.promote_types(cast, torch.float32)
                out[f.name] = v.to(device=device, dtype=cast)
        return replace(self, **out)

    def with_w(self, w: float | Tensor | None) -> "Cond":
        """The same conditioning with guidance weight w as a model input (a guided student, an LCM reads cond.w):
        a float or 0-d tensor is broadcast to (B,); None removes it."""
        if w is None:
            return replace(self, w=None)
        w = torch.as_tensor(w)
        if w.ndim == 0:
            device = next(getattr(self, n).device for n in BATCHED if getattr(self, n) is not None)
            w = w.to(device=device, dtype=torch.float32).expand(len(self))
        return replace(self, w=w)

    def __repr__(self) -> str:
        parts = []
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None:
                parts.append(f"{f.name}={tuple(v.shape)}" if isinstance(v, Tensor) else f"{f.name}={v!r}")
        return f"Cond({', '.join(parts)})"


def labels(y: Tensor, num_classes: int) -> Cond:
    """Class labels (B,) as the conditioning of a class-conditional model: Cond(y=y, null_y=num_classes) (index
    num_classes is the null label of classifier-free guidance)."""
    if not isinstance(y, Tensor):
        raise TypeError(f"labels(y, num_classes) takes a label tensor (B,); got {type(y).__name__}")
    return Cond(y=y, null_y=int(num_classes))


def labelled(sample: Callable[[int, torch.Generator], tuple[Tensor, Tensor]], num_classes: int
             ) -> Callable[[int, torch.Generator], dict]:
    """A labelled data sampler (n, g) -> (x0, y) as a course data source: (n, g) -> {"x": x0, "cond": labels(y, K)}."""
    def sample_batch(n: int, g: torch.Generator) -> dict:
        x0, y = sample(n, g)
        return {"x": x0, "cond": labels(y, num_classes)}
    return sample_batch


def unpack(batch: Mapping[str, Any]) -> tuple[Tensor, Cond | None]:
    """A course batch {"x": x0 (B, ...), "cond": Cond (optional)} as (x0, cond): what every method's step reads.
    Data sources are (n, generator) -> such a dict (`labelled`, data2d.batches, minisd.digit_batches)."""
    if not isinstance(batch, Mapping) or "x" not in batch:
        raise TypeError("a course batch is a dict {'x': x0, 'cond': Cond or None}; got "
                        f"{type(batch).__name__} (wrap an x0 sampler as lambda n, g: {{'x': sample(n, g)}}, "
                        "a labelled one with conditioning.labelled)")
    return batch["x"], check(batch.get("cond"))


def with_end_time(cond: Cond | None, s: Tensor | None) -> Cond | None:
    """cond (or no conditioning) with the end time s (B,) of a flow map X(x_t, t -> s) as a model input: what a
    flow-map model (models.flow_map_student) reads besides (x, t). s None removes it (a teacher's call)."""
    if check(cond) is None:
        return None if s is None else Cond(s=s)
    return replace(cond, s=s)


def check(cond: Cond | None) -> Cond | None:
    """The one model call's third argument: a Cond or None. A bare label tensor is refused with the fix."""
    if cond is None or isinstance(cond, Cond):
        return cond
    if isinstance(cond, Tensor):
        raise TypeError("a course model is called model(x, t, cond) with cond a conditioning.Cond (or None), not a "
                        "label tensor: wrap class labels with conditioning.labels(y, num_classes)")
    raise TypeError(f"a course model's conditioning is a conditioning.Cond or None; got {type(cond).__name__}")


def backbone_inputs(c: Cond) -> dict:
    """The keyword arguments of a backbone `net(x, timestep, **kwargs)` for a Cond: y -> class_labels, w ->
    guidance (a guided student), text -> encoder_hidden_states, timestep_cond -> timestep_cond, s -> end_time (a
    flow map; models.Denoiser maps it to the backbone's time units like t); fields that are None are left out, so a
    backbone without them is called as before. Used by models.Denoiser."""
    if c.pooled is not None:
        raise ValueError("this backbone takes no pooled text embedding (Cond.pooled is for SDXL-type models)")
    names = {"y": "class_labels", "w": "guidance", "text": "encoder_hidden_states", "timestep_cond": "timestep_cond",
             "s": "end_time"}
    return {arg: getattr(c, name) for name, arg in names.items() if getattr(c, name) is not None}
