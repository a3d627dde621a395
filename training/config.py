"""Hydra/OmegaConf glue: the `${root:}` resolver (the repository folder), so configs never depend on
the working directory."""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("root"):
        OmegaConf.register_new_resolver("root", lambda: str(ROOT))


register_resolvers()
