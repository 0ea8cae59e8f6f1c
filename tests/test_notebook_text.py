"""No measured number typed into the markdown of a second-edition notebook (DESIGN.md, "Measurements").

A notebook prints its tables from the run and its text reads them ("the table above"), or a check cell compares a
result with the claim; a number typed into markdown goes stale the day a budget, a seed or a library default
changes. This test scans the markdown cells of every notebook listed in ALLOWED and fails on any digit that is
not part of

* LaTeX math ($...$, $$...$$), a code span or a fenced code block;
* a citation: a year after an author ("Ho et al. 2020", "Salimans & Ho 2022", "Yin et al. 2023/2024"), "Eq. 14",
  "Alg. 1", "Sec. 3" / "section 4", "Table 2", "Fig. 3", "arXiv 2202.00512";
* a cross-reference inside the course: "notebook 01", "notebooks 08–10", "Exercise 0.2", "Question 1";
* markup: a heading's section number ("## 3. Sampling", "# 00 · Why distill?"), an ordered-list marker ("1. ");
* a markdown table of published results: a table whose caption (the nearest non-empty line above it) contains the
  word "published", e.g. "**Published results** (Salimans & Ho 2022, Table 2):";
* a phrase in the notebook's allow-list below: dataset facts, published facts with their source, definitions.

Second-edition notebooks are added to ALLOWED as they are converted.
"""
from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]

# Phrases anywhere in the course that contain digits but are names, not numbers.
COMMON = ["2D", "float32", "float64", "CIFAR-10", "DPM-Solver++(2M)", "DMD2", "2-Wasserstein", "1-rectified flow", "2-rectified flow",
          "3-rectified flow"]

# Per notebook: phrases with digits that are not measurements of the run (each with the reason it may stay).
ALLOWED: dict[str, list[str]] = {
    "00_why_distill.ipynb": [
        "25–50 NFEs",             # Stable Diffusion's usual step counts (its published pipelines' defaults)
        "in 1–4",                 # step counts the distilled SD models report (LCM, InstaFlow, DMD2, Hyper-SD papers)
        "1–4 NFEs", "1–4 steps",  # the budgets distillation targets: a goal, not a measurement
        "first 1 500",            # scikit-learn's digits: the course's fixed split (images.load_digits)
        "1 797 handwritten digits",
        "other 297 digits",
        "16×16", "32×32",         # image sizes of the digits and CIFAR-10 teachers
    ],
    "01_progressive_distillation.ipynb": [
        "1–4 steps",              # the budgets distillation targets (notebook 00): a goal, not a measurement
        "1-step", "2-step",       # names of students by their step count (a design choice, not a measurement)
    ],
    "02_guided_distillation.ipynb": [
        "Stage 1", "stage 1", "stage-1", "Stage 2", "stage 2",   # the names of Meng et al.'s two stages
        "1-step", "4-step",       # names of students by their step count (a design choice, not a measurement)
    ],
    "03_rectified_flow.ipynb": [
        "1-RF", "2-RF", "3-RF",   # names: the k-rectified flow after k - 1 reflows (Liu et al. 2022)
        "Theorem 3.3", "Theorem 3.5",  # the paper's theorems
        "RK45", "L2",             # names of a solver and of a distance
        "Heun, 64 steps", "64-step", "1, 2, 4 and 64 Euler steps",  # settings of the code, not measurements
        "1–4 steps", "rounds 1–3",  # step counts and rounds the section is about, not measurements
        "Round 0", "round 0",     # the name of the independent coupling in the figure
    ],
    "04_instaflow.ipynb": [
        "1-RF", "2-RF",           # names: the k-rectified flow after k - 1 reflows (Liu et al. 2022)
        "L2", "L1", "Lap1",       # names of distances
        "Stable Diffusion 1.5",   # the paper's teacher model
        "Stage 2", "stage 2",     # the recipe's numbered stages (the paper's pipeline)
        "16×16", "8-mode",        # the digits' image size, the unconditional mixture's number of modes
        "16-step", "1, 4 and 16 Euler steps", "DPM-Solver++ 16 steps",  # settings of the code, not measurements
        "round 0", "Theorem\n3.5",  # the reflow round's index (notebook 03); Liu et al. 2022's theorem
    ],
    "11_hyper_sd.ipynb": [
        "SD 1.5",                 # the model's name (the paper's LoRAs are for SD 1.5 and SDXL)
    ],
    "12_leaderboard.ipynb": [
        "2-RF",                   # the 2-rectified flow's name (notebook 03)
    ],
    "13_scaling_up.ipynb": [
        "2-RF",                   # the 2-rectified flow's name (InstaFlow's notation)
        "SD 1.5", "Stable Diffusion 1.5",   # the model's name
        "bf16",                   # a number format's name
        "L1", "L2",               # the distances' names
        "199 A100-days",          # InstaFlow's published training budget (Liu et al. 2024, model cards)
    ],
    "05_consistency_models.ipynb": [
        "ImageNet 64",                      # the dataset's name (64x64 images), in the paper's hyperparameters
        "FID 3.55 (CD) against 8.70 (CT)",  # published: Song et al. 2023, abstract and Table 2 (CIFAR-10, one step)
        "to 2.83",                          # published: Song & Dhariwal 2024, iCT on CIFAR-10, one step
        "L2",                               # the distance's name
        "Theorem 2",                        # Song et al. 2023's theorem (CT's loss is CD's as N grows)
    ],
    "06_latent_consistency.ipynb": [
        "SD 1.x", "SD 1.5", "SD 2.1",      # model names (Stable Diffusion versions)
        "within 1.5x", "within 3 points",  # the course's target for the four-step student (a goal, not a measurement)
        "768×768 took 32 A100 GPU hours",  # published: Luo et al. 2023, arXiv 2310.04378 (abstract)
    ],
    "07_trajectory_consistency.ipynb": [
        "50-point DDIM grid",              # LCM's training grid (LCMScheduler's original_inference_steps): a setting
        "issue 8305",                      # the number of a diffusers issue (eta out of range)
    ],
    "08_adversarial_distillation.ipynb": [
        "SD-Turbo", "SDXL-Turbo", "SD3-Turbo",   # names of the released students (Stability AI)
        "DINOv2 ViT-S",                   # ADD's feature network (the paper's choice)
        "timesteps 999, 749, 499, 249",   # ADD's student timesteps (the paper's T_student)
        "StyleGAN2",                      # the name of a GAN (its lazy regularisation)
        "R1",                             # the name of a penalty (Mescheder et al. 2018)
        "DINOv2",                         # the name of a feature network
        "DPM-Solver++, 64 steps",         # the teacher's sampler setting, not a measurement
    ],
    "09_distribution_matching.ipynb": [
        "FID 1.28", "(2.32,",              # published: DMD2 (Yin et al. 2024) Table 1, ImageNet 64x64, and its teacher
        "SD 1.5", "SDXL",                  # model names (Stable Diffusion versions)
        "A100-days",                       # the unit of DMD2's estimate of the cost of SDXL-scale pairs (published)
        "timesteps 999, 749, 499, 249", "999 (and 749, 499, 249",   # DMD2's released SDXL grid (a setting)
        "1.75 (SD 1.5) or 8 (SDXL), TTUR 10 or 5",                  # DMD2's released recipes (experiments/*.sh)
        "timestep 999",                    # SD's first timestep (a setting)
        "published: 41k", "a batch of 2048", "both learning rates 1e-5",  # published: DMD2's SD 1.5 recipe,
        "experiments/laion6.25",                                            # its script's folder (tianweiy/DMD2)
    ],
    "14_flow_maps.ipynb": [
        "Modeling\", 2025",                 # the MeanFlow paper's title and year (Geng et al. 2025, arXiv)
    ],
    "10_gdd.ipynb": [
        "StyleGAN2", "AFHQv2",             # names of a GAN and of a data set
        "ImageNet-64",                     # the data set's name (64x64 images)
        "UNet2DModel", "MLP2D",            # class names of the course's backbones
        "R1",                              # the name of a gradient penalty (Mescheder et al. 2018)
    ],
}

MATH_BLOCK = re.compile(r"\$\$.*?\$\$", re.S)
MATH_INLINE = re.compile(r"\$[^$\n]+\$")
FENCE = re.compile(r"```.*?```", re.S)
CODE_SPAN = re.compile(r"`[^`\n]+`")
HTML_COMMENT = re.compile(r"<!--.*?-->", re.S)
HEADING_NUMBER = re.compile(r"^(#{1,6}\s+)[0-9]+(?:\.[0-9]+)*\.?\s*(?:·\s*)?", re.M)
LIST_MARKER = re.compile(r"^(\s*)[0-9]+[.)]\s", re.M)
YEAR = r"(?:19|20)[0-9]{2}[a-z]?(?:/(?:19|20)?[0-9]{2}[a-z]?)?"
CITATIONS = [
    re.compile(r"(?:et al\.|\b[A-Z][A-Za-z'-]+),?\s+" + YEAR + r"\b"),                         # Ho et al. 2020
    re.compile(r"\b(?:Eqs?|Alg|Algorithm|Secs?|Section|Table|Fig|Figure|Appendix|App)\.?\s*"
               r"[0-9]+(?:\.[0-9]+)*(?:\s*(?:[-–,]|and)\s*[0-9]+(?:\.[0-9]+)*)*", re.I),          # Eq. 14, section 4
    re.compile(r"\barXiv:?\s*[0-9]{4}\.[0-9]{4,5}(?:v[0-9]+)?", re.I),                         # arXiv 2202.00512
    re.compile(r"\bnotebooks?\s+[0-9]{2}(?:\s*(?:[-–,]|and|or)\s*[0-9]{2})*", re.I),           # notebooks 08–10
    re.compile(r"\b(?:Exercises?|Questions?)\s+[0-9]+(?:\.[0-9]+)?[a-z]?", re.I),               # Exercise 0.2
]
DIGIT = re.compile(r"[0-9]")


def _strip_published_tables(text: str) -> str:
    """Drop markdown tables whose caption (nearest non-empty line above) says "published"."""
    out, caption, in_published = [], "", False
    for line in text.split("\n"):
        if line.lstrip().startswith("|"):
            if not in_published and "published" in caption.lower() and (not out or not out[-1].lstrip().startswith("|")):
                in_published = True
            if in_published:
                continue
        else:
            in_published = False
            if line.strip():
                caption = line
        out.append(line)
    return "\n".join(out)


def measured_numbers(text: str, allowed: list[str]) -> list[str]:
    """The snippets of a markdown text that still hold a digit once math, code, citations, cross-references,
    markup, published tables and the allowed phrases are removed (each with some context)."""
    for pattern in (FENCE, MATH_BLOCK, MATH_INLINE, CODE_SPAN, HTML_COMMENT):
        text = pattern.sub(" ", text)
    text = _strip_published_tables(text)
    text = HEADING_NUMBER.sub(r"\1", text)
    text = LIST_MARKER.sub(r"\1", text)
    for pattern in CITATIONS:
        text = pattern.sub(" ", text)
    for phrase in sorted(COMMON + allowed, key=len, reverse=True):
        text = text.replace(phrase, " ")
    hits = []
    for m in DIGIT.finditer(text):
        if hits and m.start() < hits[-1][1]:
            continue  # already inside the previous snippet
        start, end = max(0, m.start() - 40), min(len(text), m.end() + 40)
        hits.append((start, end, " ".join(text[start:end].split())))
    return [snippet for _, _, snippet in hits]


def scan(path: Path, allowed: list[str]) -> list[str]:
    nb = nbformat.read(path, as_version=4)
    problems = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            problems += [f"{path.parent.name}/{path.name}, markdown cell {i}: ...{s}..."
                         for s in measured_numbers(cell.source, allowed)]
    return problems


@pytest.mark.parametrize("folder", ["solutions", "notebooks"])
@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_no_measured_numbers_in_markdown(folder, name):
    problems = scan(ROOT / folder / name, ALLOWED[name])
    assert not problems, (
        "measured numbers typed into markdown (print them from the run and refer to the table, or check them in a "
        "code cell; a published number needs its source and a 'published' table caption or an ALLOWED entry in "
        "tests/test_notebook_text.py):\n" + "\n".join(problems))


# The scanner itself, on sentences of the first edition of notebook 00 and on what it must leave alone.

def test_flags_numbers_from_the_first_edition():
    first_edition = [
        "at 1–2 NFEs none is usable (in laptop mode the best 1-NFE result is about ten times the data floor)",
        "at ~900 samples the real-vs-real distance itself moves between about 70 and 100",
        "measures the exact teacher at 0.98x the floor and the trained one at 1.14x",
        "The squares appear at 4 to 8 NFEs and sharpen up to 16 and beyond.",
    ]
    for sentence in first_edition:
        assert measured_numbers(sentence, ALLOWED["00_why_distill.ipynb"]), sentence


def test_leaves_math_code_citations_and_published_tables_alone():
    text = "\n".join([
        "## 3. Sampling is solving an ODE",
        "1. first item, see notebook 01 and notebooks 08–10, Exercise 0.2, Question 3",
        "DDIM (Song et al. 2021, Eq. 12), Heun (Karras et al. 2022, Alg. 1), section 4, Salimans & Ho 2022, "
        "DMD (Yin et al. 2023/2024), arXiv 2202.00512",
        "$x_t = \\alpha(t) x_0$, $$\\sum_{k=1}^K$$, `metrics.projections(2, 256, seed=0)`",
        "",
        "**Published results** (Salimans & Ho 2022, Table 2):",
        "",
        "| steps | FID |",
        "|---|---|",
        "| 4 | 3.0 |",
    ])
    assert measured_numbers(text, []) == []
    unmarked = "Our results:\n\n| steps | SWD |\n|---|---|\n| 4 | 0.3 |"
    assert measured_numbers(unmarked, [])
