"""Figures: the ones the README and docs/ show, regenerated from benchmark results and the shipped teachers, and the
interactive ones of the notebooks (notebook 03's reflow explorer, the coupling figures of notebooks 03 and 04).

    python -m course_lib.figures [--bench runs/bench_teacher.json] [--instaflow runs/bench_instaflow.json]
                                 [--out docs/figures]

Reads the teacher benchmark's JSON (run `python -m course_lib.bench teacher --mode laptop --out ...` first) and,
when present, the InstaFlow benchmark's (its capacity sweep). Importing this module does not change matplotlib's
backend (notebooks keep their inline figures); the command line switches to Agg.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import Tensor

from .conditioning import labels
from .distill import instaflow
from .grids import uniform
from .metrics import straightness
from .plotting import LIM_2D, image_grid, nfe_curves
from .processes import RectifiedFlow
from .recipes.instaflow import DIGITS_RECIPE, load_digits_model
from .recipes.reflow import reflow_2d_budget, reflow_2d_models
from .samplers import dpm_solver_pp_2m, euler, generate, heun
from .teachers import load_teacher


def save(fig, path: Path, tight: bool = False) -> Path:
    """Write a figure (110 dpi; tight: cropped to its content) to `path`, close it, return the path."""
    fig.savefig(path, dpi=110, **({"bbox_inches": "tight"} if tight else {}))
    plt.close(fig)
    return path


def teacher_quality(result: dict, out: Path) -> Path:
    """SWD against NFE for each teacher and solver, one panel per 2D dataset, with the data floor."""
    return _swd_panels(result["rows"], lambda m: m != "data", "{ds}: teacher quality vs NFE ({n} samples)",
                       out / "teacher_quality_vs_nfe.png")


def _swd_panels(rows: list[dict], keep: Callable[[str], bool], title: str, path: Path, with_std: bool = False
                ) -> Path:
    """SWD against NFE of the models `keep` accepts (the first row of each (model, nfe)), one panel per 2D dataset
    (title formatted with {ds} and the rows' sample count {n}), with the data floor; with_std: (mean, std) points and
    floor, drawn with error bars over the evaluation seeds."""
    value = (lambda r: (r["value"], r.get("std", 0.0))) if with_std else (lambda r: r["value"])
    datasets = [d for d in ("checkerboard", "gmm") if any(r["dataset"] == d for r in rows)]
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 3.8), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        mine = [r for r in rows if r["dataset"] == ds and r["metric"] == "swd"]
        curves: dict[str, tuple[list[int], list]] = {}
        for r in mine:
            if keep(r["model"]) and r["nfe"] not in curves.setdefault(r["model"], ([], []))[0]:
                curves[r["model"]][0].append(r["nfe"]), curves[r["model"]][1].append(value(r))
        floor = next(value(r) for r in mine if r["model"] == "data")
        nfe_curves(curves, floor=floor, ax=ax, title=title.format(ds=ds, n=mine[0].get("n", "")))
    fig.tight_layout()
    return save(fig, path)


def digits_grid(out: Path, nfes=(1, 2, 4, 8, 16, 32)) -> Path:
    """The digits teacher's samples at increasing NFE, same noise in every row."""
    teacher = load_teacher("digits")
    y = labels(torch.arange(10).repeat(2), teacher.net.num_classes)
    rows = [(f"{k} NFE", generate(teacher, teacher.process, (len(y), 1, 16, 16), "dpmpp2m", k,
                                  generator=torch.Generator().manual_seed(4), cond=y)) for k in nfes]
    return _image_rows(rows, "digits teacher, DPM-Solver++(2M)", out / "digits_teacher_nfe.png")


def _image_rows(rows: list[tuple[str, Tensor]], title: str, path: Path) -> Path:
    """One row of images (B, C, H, W) per (label, images), the label on its left; saved cropped to its content."""
    fig, axes = plt.subplots(len(rows), 1, figsize=(8, 0.55 * len(rows) + 0.4))
    for ax, (label, x) in zip(axes, rows):
        image_grid(x, nrow=len(x), ax=ax)
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle(title, fontsize=10)
    return save(fig, path, tight=True)


def instaflow_sweep(result: dict, out: Path, n_pairs: int = 10_000, steps: int = 2000) -> Path:
    """The InstaFlow benchmark's capacity sweep: held-out error and SWD of fresh one-step students against width,
    on the teacher's coupling ("direct") and the 2-RF's ("reflow"), one row of panels per 2D dataset; error bars:
    the spread over the benchmark's evaluation seeds."""
    rows = [r for r in result["rows"] if r["model"].startswith("sweep-") and r["n_pairs"] == n_pairs
            and r["train_steps"] == steps]
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(len(datasets), 2, figsize=(8, 2.9 * len(datasets)), squeeze=False)
    for (ax_e, ax_s), ds in zip(axes, datasets):
        for coupling, style in (("direct", "o-"), ("reflow", "s--")):
            for ax, metric in ((ax_e, "heldout_err"), (ax_s, "swd_data")):
                pts = sorted((r["width"], r["value"], r.get("std", 0.0)) for r in rows
                             if r["dataset"] == ds and r["coupling"] == coupling and r["metric"] == metric)
                w, v, e = zip(*pts)
                ax.errorbar(w, v, yerr=e, fmt=style, capsize=2, label=coupling)   # mean ± std over eval seeds
        for ax, what in ((ax_e, "held-out regression error (log)"), (ax_s, "SWD (linear, from 0)")):
            ax.set_xscale("log", base=2), ax.set_xlabel("student width")
            ax.set_title(f"{ds}: {what}", fontsize=9), ax.legend(fontsize=8)
        ax_e.set_yscale("log"), ax_s.set_ylim(bottom=0), ax_s.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"fresh one-step students, {n_pairs} pairs, {steps} updates (bench instaflow, {result['mode']})",
                 fontsize=9)
    fig.tight_layout()
    return save(fig, out / "instaflow_capacity_sweep.png")


def instaflow_digits(out: Path) -> Path:
    """The shipped digits InstaFlow models against the guided teacher and direct distillation, same noise."""
    w = DIGITS_RECIPE["w"]
    teacher = load_teacher("digits")
    y = labels(torch.arange(10).repeat(2), teacher.net.num_classes)
    x1 = torch.randn(len(y), 1, 16, 16, generator=torch.Generator().manual_seed(4))
    gt = instaflow.guided(teacher, w)
    flow2 = load_digits_model("digits-if-2rf")
    rows = [(f"teacher (w={w}), 16 steps", dpm_solver_pp_2m(gt, x1, uniform(16), gt.process, cond=y)),
            ("2-RF, 1 Euler step", euler(flow2, x1, uniform(1), flow2.process, cond=y)),
            ("InstaFlow, 1 step", instaflow.one_step(load_digits_model("digits-instaflow"), x1, y)),
            ("direct distillation, 1 step", instaflow.one_step(load_digits_model("digits-direct"), x1, y))]
    return _image_rows(rows, "digits: InstaFlow against direct distillation (same noise and labels)",
                       out / "instaflow_digits.png")


def straightening(out: Path, dataset: str = "checkerboard", mode: str = "laptop", n_paths: int = 150,
                  n_samples: int = 4000, ode_steps: int = 32) -> Path:
    """The README's first picture: trajectories straighten and steps collapse (notebook 03's arc on one page).
    Top: the ODE paths of the flow-matching teacher (1-RF) and of its reflows (2-RF, 3-RF) from the same noise,
    solved accurately (Heun), with their straightness S(Z); bottom: samples from one Euler step of the teacher, of
    the 2-RF, and of the 2-RF distilled to one step, beside the teacher's many-step samples. Models: the shipped
    teacher and recipes.reflow's 2D reflows at `mode`'s budget (pairs cached)."""
    from matplotlib.collections import LineCollection

    models, _ = reflow_2d_models(dataset, reflow_2d_budget(mode), progress=False)
    rf, g = RectifiedFlow(), torch.Generator().manual_seed(7)
    x_paths, x_many = torch.randn(n_paths, 2, generator=g), torch.randn(n_samples, 2, generator=g)
    fig, axes = plt.subplots(2, 3, figsize=(9.6, 6.6))
    with torch.no_grad():
        for ax, name in zip(axes[0], ("1-rf", "2-rf", "3-rf")):
            path = heun(models[name], x_paths, uniform(ode_steps), rf, return_path=True)
            s = straightness(euler(models[name], x_paths, uniform(64), rf, return_path=True), uniform(64))
            coupling_lines(ax, path[0], path[-1], color="0.85", n_show=n_paths, lw=0.3, alpha=0.6)
            ax.add_collection(LineCollection(path.transpose(0, 1).numpy(), colors="C1", linewidths=0.6, alpha=0.8))
            label = "teacher (1-RF)" if name == "1-rf" else name.upper()
            ax.set_title(f"{label}: ODE paths, S(Z) = {s:.3g}", fontsize=9)
        panels = (("teacher, 64 Heun steps", heun(models["1-rf"], x_many, uniform(64), rf)),
                  ("teacher, 1 Euler step", euler(models["1-rf"], x_many, uniform(1), rf)),
                  ("2-RF distilled, 1 step", euler(models["2-rf-distill"], x_many, uniform(1), rf)))
        for ax, (title, x) in zip(axes[1], panels):
            ax.scatter(*x.numpy().T, s=1.2, c="C0", alpha=0.5, linewidths=0)
            _frame_2d(ax).set_title(title, fontsize=9)
    fig.suptitle(f"{dataset}: reflow straightens the teacher's paths (grey: where each path starts and ends), "
                 f"so one step lands where many did", fontsize=9)
    fig.tight_layout()
    return save(fig, out / "straightening.png")


# ----------------------------------------------------------------------------------------------------------------
# Couplings and the reflow explorer (notebooks 03 and 04)
# ----------------------------------------------------------------------------------------------------------------

def _frame_2d(ax, lim: float = LIM_2D):
    ax.set_xlim(-lim, lim), ax.set_ylim(-lim, lim), ax.set_aspect("equal"), ax.set_xticks([]), ax.set_yticks([])
    return ax


def coupling_lines(ax, eps: Tensor, x0: Tensor, color: str = "C0", title: str = "", n_show: int = 300,
                   lw: float = 0.4, alpha: float = 0.5, lim: float = LIM_2D):
    """A coupling drawn as straight lines from each noise eps_i (grey dots) to its sample x0_i (black dots), for the
    first n_show pairs of eps, x0 (N, 2). Lines that cross are what a flow has to bend around."""
    from matplotlib.collections import LineCollection

    a, b = eps[:n_show].detach().cpu().numpy(), x0[:n_show].detach().cpu().numpy()
    ax.add_collection(LineCollection(np.stack([a, b], axis=1), colors=color, linewidths=lw, alpha=alpha))
    ax.scatter(*a.T, s=3, c="0.6", zorder=2), ax.scatter(*b.T, s=4, c="k", zorder=3)
    _frame_2d(ax, lim)
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def crossing_share(eps: Tensor, x0: Tensor, n_pairs: int = 300) -> float:
    """The share of pairs of segments [eps_i, x0_i], [eps_j, x0_j] (first n_pairs, all i < j) that cross: a number
    for how tangled a coupling is (the independent coupling crosses often; a straight flow's hardly ever)."""
    p, q = eps[:n_pairs].double(), x0[:n_pairs].double()
    d = q - p                                                                         # (n, 2) directions
    cross = lambda u, v: u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]
    r = p[None] - p[:, None]                                                          # (n, n, 2): p_j - p_i
    den = cross(d[:, None], d[None])                                                  # d_i x d_j
    s = cross(r, d[None]) / den                                                       # position along segment i
    u = cross(r, d[:, None]) / den                                                    # position along segment j
    hit = (s > 0) & (s < 1) & (u > 0) & (u < 1) & (den.abs() > 1e-12)
    n = len(p)
    return float(hit.triu(1).sum()) / (n * (n - 1) / 2)


ROUND0 = "0: independent"


class ReflowExplorer:
    """Everything notebook 03's straightening figure shows, precomputed, so that moving a slider only redraws.

    flows[dataset] = {"1-RF": flow, "2-RF": ..., ...}; data[dataset] = (x0_show (n_show, 2), x0_many (n_many, 2)):
    independent data samples, the partners of round 0 (the independent coupling, straight lines that cross);
    x_show (n_show, 2) / x_many (n_many, 2): the noise of the drawn paths / of the sample panel. For each dataset,
    round and number of Euler steps k: the Euler paths (k+1, n_show, 2) and samples; for each flow, its ODE solved
    accurately (Heun, ode_steps steps: close to exact) from the same noise, drawn as a dashed overlay with its
    endpoints, so the corners that Euler cuts are visible; and S(Z) on the 64-step Euler paths."""

    def __init__(self, flows: dict[str, dict[str, Callable]], data: dict[str, tuple[Tensor, Tensor]], x_show: Tensor,
                 x_many: Tensor, steps: Sequence[int] = (1, 2, 4, 8, 16, 32, 64), ode_steps: int = 64,
                 straightness_fn: Callable[[Tensor, Tensor], float] | None = None):
        rf, s_of = RectifiedFlow(), straightness_fn or straightness
        self.datasets, self.steps = list(flows), tuple(steps)
        self.rounds = [ROUND0] + list(next(iter(flows.values())))
        self.paths, self.samples, self.ode, self.s = {}, {}, {}, {}
        with torch.no_grad():
            for ds, fl in flows.items():
                x0_show, x0_many = data[ds]
                for k in self.steps:                          # round 0: the straight lines of independent pairs
                    t = uniform(k).to(x_show.dtype)[:, None, None]
                    self.paths[(ds, ROUND0, k)] = ((1 - t) * x0_show + t * x_show).numpy()
                    self.samples[(ds, ROUND0, k)] = x0_many.numpy()
                for r, f in fl.items():
                    for k in self.steps:
                        self.paths[(ds, r, k)] = euler(f, x_show, uniform(k), rf, return_path=True).numpy()
                        self.samples[(ds, r, k)] = euler(f, x_many, uniform(k), rf).numpy()
                    self.ode[(ds, r)] = heun(f, x_show, uniform(ode_steps), rf, return_path=True).numpy()
                    self.s[(ds, r)] = s_of(euler(f, x_show, uniform(64), rf, return_path=True), uniform(64))
        self.fig = None

    @staticmethod
    def at_time(path: np.ndarray, t: float) -> np.ndarray:
        """Positions (B, 2) at time t on paths (k+1, B, 2) sampled at t = 1, ..., 0 (linear between grid times)."""
        k = len(path) - 1
        u = (1 - t) * k
        i = min(int(np.floor(u)), k - 1)
        w = u - i
        return (1 - w) * path[i] + w * path[i + 1]

    def _build(self):
        from matplotlib.collections import LineCollection

        fig, (ax_p, ax_s) = plt.subplots(1, 2, figsize=(8.4, 4.2))
        for ax in (ax_p, ax_s):
            _frame_2d(ax)
        self.art = dict(
            coupling=LineCollection([], colors="0.75", linewidths=0.5),
            ode=LineCollection([], colors="C0", linewidths=0.8, linestyles="--", alpha=0.7),
            trajs=LineCollection([], colors="C1", linewidths=0.7, alpha=0.8))
        for name in ("coupling", "ode", "trajs"):
            ax_p.add_collection(self.art[name])
        self.art["ode_end"] = ax_p.scatter([], [], s=10, c="C0", marker="x", linewidths=0.8, zorder=2)
        self.art["starts"] = ax_p.scatter([], [], s=3, c="0.6", zorder=2)
        self.art["moving"] = ax_p.scatter([], [], s=7, c="k", zorder=3)
        self.art["samples"] = ax_s.scatter([], [], s=1.5, c="C0", alpha=0.5, linewidths=0)
        fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.9, wspace=0.05)
        plt.close(fig)
        self.fig, self.ax_p, self.ax_s = fig, ax_p, ax_s

    def draw(self, dataset: str | None = None, rnd: str = "1-RF", steps: int = 1, t: float = 0.0):
        """Update the figure for (dataset, round, Euler steps, time t) and return it. Grey: each noise point joined
        to where its path ends (the coupling); orange: the Euler paths; dashed blue with crosses: the flow's ODE
        solved accurately from the same noise, and where it ends; black dots: the positions at time t."""
        if self.fig is None:
            self._build()
        ds = dataset or self.datasets[0]
        path = self.paths[(ds, rnd, steps)]
        a = self.art
        a["coupling"].set_segments(np.stack([path[0], path[-1]], axis=1))
        a["trajs"].set_segments(path.transpose(1, 0, 2))
        ode = self.ode.get((ds, rnd))
        a["ode"].set_segments([] if ode is None else ode.transpose(1, 0, 2))
        a["ode_end"].set_offsets(np.zeros((0, 2)) if ode is None else ode[-1])
        a["starts"].set_offsets(path[0])
        a["moving"].set_offsets(self.at_time(path, t))
        a["samples"].set_offsets(self.samples[(ds, rnd, steps)])
        if rnd == ROUND0:
            title = f"{ds}, round 0: independent pairs joined by straight lines (they cross), t = {t:.2f}"
        else:
            title = (f"{ds}, {rnd}: {steps} Euler step{'s' * (steps > 1)}, t = {t:.2f}, S(Z) = "
                     f"{self.s[(ds, rnd)]:.3g}\ndashed: its ODE solved accurately (x: where it ends)")
        self.ax_p.set_title(title, fontsize=8)
        n = len(self.samples[(ds, rnd, steps)])
        self.ax_s.set_title(f"{n} samples at t = 0" + (" (data: the coupling's partners)" if rnd == ROUND0 else ""),
                            fontsize=8)
        return self.fig

    def widget(self):
        """ipywidgets controls (dataset, round, Euler steps, time) that redraw the figure; needs a live kernel."""
        import ipywidgets as widgets
        from IPython.display import display

        out = widgets.Output()

        def on_change(dataset, rnd, steps, t):
            with out:
                out.clear_output(wait=True)
                display(self.draw(dataset, rnd, steps, t))

        controls = widgets.interactive(
            on_change,
            dataset=widgets.ToggleButtons(options=self.datasets, description="data"),
            rnd=widgets.ToggleButtons(options=self.rounds, value=self.rounds[1], description="round"),
            steps=widgets.SelectionSlider(options=self.steps, value=self.steps[0], description="Euler steps"),
            t=widgets.FloatSlider(min=0.0, max=1.0, step=0.05, value=0.0, description="time t", readout_format=".2f"),
        )
        return widgets.VBox([controls, out])

    def animation_html(self, frames_per_round: int = 5, n_paths: int = 80, steps: int = 1, dpi: int = 50) -> str:
        """The static fallback: an HTML + JavaScript animation (frames embedded; plays without a kernel), one panel
        per dataset, every round in turn with `steps` Euler steps, the dots moving from noise (t = 1) to data
        (t = 0), the accurate ODE paths dashed beside the Euler paths."""
        from matplotlib import animation
        from matplotlib.collections import LineCollection

        frames = [(r, t) for r in self.rounds for t in np.linspace(1, 0, max(2, frames_per_round))]
        fig, axes = plt.subplots(1, len(self.datasets), figsize=(2.9 * len(self.datasets), 3.1), dpi=dpi, squeeze=False)
        arts = []
        for ax, ds in zip(axes[0], self.datasets):
            _frame_2d(ax)
            ode, lc = LineCollection([], colors="C0", linewidths=0.6, linestyles="--", alpha=0.7), \
                LineCollection([], colors="C1", linewidths=0.5, alpha=0.7)
            ax.add_collection(ode), ax.add_collection(lc)
            arts.append((ax, ds, lc, ode, ax.scatter([], [], s=4, c="k", zorder=3)))
        fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.86, wspace=0.05)

        def frame(i):
            rnd, t = frames[i]
            for ax, ds, lc, ode, dots in arts:
                path = self.paths[(ds, rnd, steps)][:, :n_paths]
                lc.set_segments(path.transpose(1, 0, 2))
                o = self.ode.get((ds, rnd))
                ode.set_segments([] if o is None else o[:, :n_paths].transpose(1, 0, 2))
                dots.set_offsets(self.at_time(path, t))
                what = "independent" if rnd == ROUND0 else f"{rnd}, {steps} Euler step{'s' * (steps > 1)}"
                ax.set_title(f"{ds}: {what}\nt = {t:.2f}", fontsize=8)
            return []

        anim = animation.FuncAnimation(fig, frame, frames=len(frames), interval=300)
        html = anim.to_jshtml(default_mode="loop")
        plt.close(fig)
        return html


def consistency_quality(results: list[dict], out: Path) -> Path:
    """SWD against steps of the consistency students (bench cd / bench ct results, each a saved JSON; CT on CD's budget
    and ct-long) beside the teacher's DPM-Solver++ sweep and the data floor, one panel per 2D dataset, mean ± std over
    evaluation seeds."""
    models = ("teacher", "cd", "ct", "ct-long", "pd")
    return _swd_panels([r for res in results for r in res["rows"]], lambda m: m in models,
                       "{ds}: consistency students vs the teacher", out / "consistency_vs_nfe.png", with_std=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m course_lib.figures", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", default="runs/bench_teacher.json")
    ap.add_argument("--instaflow", default="runs/bench_instaflow.json")
    ap.add_argument("--cm", nargs="*", default=["runs/bench_cd.json", "runs/bench_ct.json"],
                    help="bench cd / ct results for the consistency figure (those that exist)")
    ap.add_argument("--out", default="docs/figures")
    args = ap.parse_args(argv)
    plt.switch_backend("Agg")
    bench = Path(args.bench)
    if not bench.is_file():
        raise SystemExit(f"{bench} not found: run `python -m course_lib.bench teacher --mode laptop --out {bench}` first")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path in (teacher_quality(json.loads(bench.read_text()), out), digits_grid(out), instaflow_digits(out),
                 straightening(out)):
        print(f"wrote {path}")
    insta = Path(args.instaflow)
    if insta.is_file():
        print(f"wrote {instaflow_sweep(json.loads(insta.read_text()), out)}")
    else:
        print(f"skipped the capacity-sweep figure: {insta} not found (`python -m course_lib.bench instaflow`)")
    cms = [json.loads(Path(p).read_text()) for p in args.cm if Path(p).is_file()]
    if cms:
        print(f"wrote {consistency_quality(cms, out)}")


if __name__ == "__main__":
    main()
