"""A workspace: one folder holding a survey's data roots and the configuration naming them.

``skydiff init DIR`` and ``skydiff demo`` both make one.  Its configuration ``DIR/skydiff.toml``
sets ``paths.root`` to the folder's absolute path and spells out every data root of
:class:`pipeline.core.config.PathsConfig` by its default name, relative to that root, so
that every command given ``--config DIR/skydiff.toml`` finds what the others wrote, from any
working directory: ``catalogs prefetch`` writes the Gaia store where ``astrometry`` and
``quadrant`` read it, ``priors build`` writes ``priors/prior.fits`` where the runner looks,
``reference build`` writes ``references/`` under the names the runner asks for,
``matchfile seed`` and the runner share ``matchfiles/``, and so on.
"""
from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path

import tomli_w

from pipeline.core.config import Config, ConfigError, PathsConfig, load_config

__all__ = ["CONFIG_FILE", "workspace_paths", "workspace_config", "init_workspace", "WorkspaceExistsError"]

#: The configuration file of a workspace.
CONFIG_FILE = "skydiff.toml"


class WorkspaceExistsError(ConfigError):
    """``skydiff init`` on a folder that already holds a configuration (exit 2)."""


def workspace_paths(folder: str | os.PathLike) -> PathsConfig:
    """Every data root of a workspace: ``root`` the folder's absolute path, the others their
    default names under it."""
    return PathsConfig(root=str(Path(folder).expanduser().resolve()))


def workspace_config(cfg: Config, folder: str | os.PathLike) -> Config:
    """``cfg`` with its data roots those of the workspace at ``folder``."""
    return cfg.replace(paths=workspace_paths(folder))


def _paths_toml(paths: PathsConfig) -> str:
    values = {f.name: getattr(paths, f.name) for f in fields(PathsConfig)}
    return tomli_w.dumps({"paths": values})


def init_workspace(folder: str | os.PathLike, force: bool = False) -> Path:
    """Create ``folder`` (if missing) and write its ``skydiff.toml``: the ``[paths]`` section
    of :func:`workspace_paths`, every other setting left to the embedded defaults (a line
    added to the file changes one).

    Raises
    ------
    WorkspaceExistsError
        ``folder/skydiff.toml`` exists and ``force`` is not set.
    """
    folder = Path(folder).expanduser().resolve()
    config = folder / CONFIG_FILE
    if config.exists() and not force:
        raise WorkspaceExistsError(f"{config}: a configuration is already there (--force replaces it)")
    folder.mkdir(parents=True, exist_ok=True)
    paths = workspace_paths(folder)
    text = ("# skydiff workspace (skydiff init).  Every data root is relative to paths.root; every other\n"
            "# setting is the embedded default (`skydiff config --config THIS_FILE` prints them all).\n"
            "# Give this file to every command: skydiff COMMAND --config " + str(config) + " ...\n\n"
            + _paths_toml(paths))
    from pipeline.formats.atomic import write_text_atomic
    write_text_atomic(text, config)
    load_config(config)       # what was written reads back (a path with odd characters is quoted)
    return config
