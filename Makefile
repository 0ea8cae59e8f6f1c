# The course's commands. Students: `make lab`. Instructors: `make notebooks`, `make test`, `make render`.
# Every target installs the course into .venv first (once; again when pyproject.toml changes).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODE ?= laptop
# Notebook folders that exist (git keeps no empty folders; pytest errors on a missing path).
NB_DIRS := $(wildcard solutions notebooks)
TEST_ENV := HF_HUB_OFFLINE=1 COURSE_MODE=smoke OMP_NUM_THREADS=1 MPLBACKEND=Agg

.PHONY: install lab test notebooks check render bench clean distclean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -e '.[dev]'
	touch $@

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

# Unit tests and nbval over every notebook, solutions and student versions, in smoke mode.
# --dist loadfile keeps each notebook's cells on one worker; --nbval-current-env runs the
# kernels with .venv's Python whatever kernels are registered on the machine.
test: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -n 2 --dist loadfile tests --nbval-lax --nbval-current-env $(NB_DIRS)

notebooks: $(STAMP)
	$(PY) -m course_lib.exercises build

check: $(STAMP)
	$(PY) -m course_lib.exercises check

# make render MODE=smoke NB="00_why_distill 01_progressive"
render: $(STAMP)
	$(PY) -m course_lib.render --mode $(MODE) --out html/ $(NB)

bench: $(STAMP)
	$(PY) -m course_lib.bench teacher --mode laptop --out runs/bench_teacher.json

# Generated files only; runs/ (training results) and .venv are kept (`make distclean` drops .venv).
clean:
	rm -rf html/ .pytest_cache/ *.egg-info/
	find . -path ./$(VENV) -prune -o \( -name __pycache__ -o -name .ipynb_checkpoints \) -type d -print0 | xargs -0 rm -rf

distclean: clean
	rm -rf $(VENV)
