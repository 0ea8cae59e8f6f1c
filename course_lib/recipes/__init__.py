"""The course's runs of each method: budgets by COURSE_MODE and the experiments that a notebook and its benchmark
share, the models shipped in data/ (their recipe, the command that trains them, how to load them), the students'
files, and notebook-only experiments. The methods themselves (the paper's code) are in distill/.

    reflow.py      the 2D reflow recipe (notebook 03, bench reflow); data/reflow     python -m course_lib.recipes.reflow
    instaflow.py   the 2D InstaFlow recipe and capacity sweep (notebook 04); data/instaflow
    guided.py      the 2D guided distillation recipe (notebook 02, bench guided)
    lcm.py         LCM students' files and evaluation on the mini SD, the style LoRA (notebook 06); data/lcm
    tcd.py         the TCD student's files and evaluation with SSS; data/tcd
    consistency.py the consistency students' 2D and digits budgets (bench cd and ct; the flow maps on digits)
    flowmap.py     the 2D flow-map recipes (MeanFlow, shortcut, sCM; notebook 14, bench flowmap); data/flowmap
    flowmap_digits.py  the flow-map students on digits (MeanFlow, shortcut, sCD, sCT; bench flowmap's digits rows);
                   the finite-difference tangent against the JVP      python -m course_lib.recipes.flowmap_digits fd-table
    flowmap_minisd.py  MeanFlow on the mini SD: the flow-map LoRA of the guided teacher, its plain diffusers pipeline
                   (notebook 14, bench flowmap's mini-sd rows); data/flowmap/mini-sd-meanflow
    hypersd.py     the 2D Hyper-SD budgets, known rewards and ablations (notebook 11, bench hypersd)
    leaderboard.py the board's datasets, metrics and families, the shipped 2D students, the README's short table and
                   the SD 1.5 bills (notebook 12, bench leaderboard)
"""
