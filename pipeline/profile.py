"""use-profile: merge a parameter profile (params/*.yaml, a partial params file) into params.yaml.

A profile may start from another (``extends: bbc.yaml``). The merged file is validated before it replaces
params.yaml, so a profile with a typo changes nothing.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.common import StageError, atomic
from semdlm.config import merge_params, parse_params, read_profile


def run(profile: str | Path, params: str | Path = "params.yaml") -> dict:
    profile, params = Path(profile), Path(params)
    if not profile.exists():
        raise StageError(f"profile {profile} not found; see params/*.yaml")
    merged = merge_params(yaml.safe_load(params.read_text()) or {}, read_profile(profile))
    parse_params(merged)
    with atomic(params) as tmp:
        tmp.write_text(f"# params.yaml with profile {profile} merged in; `git checkout params.yaml` to undo\n"
                       + yaml.safe_dump(merged, sort_keys=False))
    return merged
