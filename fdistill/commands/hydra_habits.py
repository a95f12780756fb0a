"""Hydra's command-line habits for ``fdistill train`` / ``fdistill distill``, on top of Hydra's compose API.

``fdistill`` composes its config with ``hydra.compose`` (no ``@hydra.main``: one entry point for every command, and
``accelerate launch -m fdistill.cli`` works unchanged), so Hydra's own flags are implemented here:

- ``--cfg job|hydra|all`` (``-c``; ``--resolve`` resolves interpolations): print the composed config as YAML and exit
  without training;
- ``-m`` / ``--multirun``: comma-separated (``a,b``), ``range(...)`` and ``choice(...)`` sweeps, parsed by Hydra's
  ``OverridesParser``; every combination runs in turn (in this process, so it also works under ``accelerate
  launch``) in ``<train.run_dir>/<index>_<key=value,...>`` and a summary table follows;
- ``hydra.run.dir=PATH`` and ``hydra.sweep.dir=PATH`` are ``train.run_dir=PATH`` (under ``-m``: the sweep's base
  directory); any other ``hydra.*`` override is refused with the list of supported ones;
- ``--help`` lists every ``train.*`` option with its default and meaning, read from ``TrainConfig`` itself.
"""
from __future__ import annotations

import dataclasses
import itertools
import re
import sys
from dataclasses import dataclass, field
from typing import Callable

from ..training.config import TrainConfig

CFG_PARTS = ("job", "hydra", "all")
# Hydra's run directories map onto fdistill's single output directory
HYDRA_RUN_DIR_KEYS = ("hydra.run.dir", "hydra.sweep.dir")


class UsageError(ValueError):
    """A command line that cannot run; the message is one line naming the argument and what is allowed."""


@dataclass
class CommandLine:
    """The Hydra flags of a command line and its config overrides (``hydra.run.dir`` already mapped)."""

    overrides: list[str] = field(default_factory=list)
    cfg: str | None = None
    resolve: bool = False
    multirun: bool = False
    help: bool = False


def override_key(override: str) -> str:
    """The key of ``[+|++|~]key=value`` (``hydra.run.dir=out`` -> ``hydra.run.dir``)."""
    return override.split("=", 1)[0].lstrip("+~")


def map_hydra_override(override: str) -> str:
    """``hydra.run.dir=PATH`` / ``hydra.sweep.dir=PATH`` -> ``train.run_dir=PATH``; other overrides unchanged; any
    other ``hydra.*`` / ``hydra/<group>`` override raises UsageError naming the supported ones."""
    key = override_key(override)
    if key != "hydra" and not key.startswith(("hydra.", "hydra/")):
        return override
    if key in HYDRA_RUN_DIR_KEYS and "=" in override:
        return "train.run_dir=" + override.split("=", 1)[1]
    raise UsageError(f"{override!r} is not supported: fdistill composes with Hydra's compose API; supported: "
                     f"{', '.join(HYDRA_RUN_DIR_KEYS)} (both = train.run_dir), --cfg, --resolve, -m/--multirun")


def parse_command_line(argv: list[str]) -> CommandLine:
    """Split Hydra's flags from the overrides. Raises UsageError for an unknown flag or a bad ``--cfg`` value."""
    line = CommandLine()
    args = iter(argv)
    for arg in args:
        if arg in ("-h", "--help"):
            line.help = True
        elif arg in ("-m", "--multirun"):
            line.multirun = True
        elif arg == "--resolve":
            line.resolve = True
        elif arg in ("-c", "--cfg") or arg.startswith("--cfg="):
            line.cfg = arg.split("=", 1)[1] if "=" in arg else next(args, None)
            if line.cfg not in CFG_PARTS:
                raise UsageError(f"--cfg takes one of {', '.join(CFG_PARTS)}, got {line.cfg!r}")
        elif arg.startswith("-"):
            raise UsageError(f"unknown option {arg!r}; allowed: --help, --cfg {{{'|'.join(CFG_PARTS)}}}, --resolve, "
                             "-m/--multirun, and KEY=VALUE overrides")
        else:
            line.overrides.append(map_hydra_override(arg))
    return line


# ---------------------------------------------------------------------------------------------------------- help


def attribute_docs(cls: type) -> dict[str, str]:
    """The ``Attributes:`` section of a Google-style class docstring as {field name: one-line description}."""
    docs: dict[str, str] = {}
    doc = (cls.__doc__ or "").split("Attributes:", 1)
    name = None
    for line in doc[1].splitlines() if len(doc) == 2 else ():
        match = re.match(r"^\s{4,8}(\w+): (.*)$", line)
        if match and match.group(1) in {f.name for f in dataclasses.fields(cls)}:
            name = match.group(1)
            docs[name] = match.group(2).strip()
        elif name and line.strip():
            docs[name] += " " + line.strip()
    return docs


def field_default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def train_options_help() -> str:
    """One block per ``train.*`` field: key, type and default, then its meaning (TrainConfig's docstring)."""
    docs = attribute_docs(TrainConfig)
    blocks = []
    for f in dataclasses.fields(TrainConfig):
        type_name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        blocks.append(f"  train.{f.name} ({type_name}, default: {field_default(f)!r})\n      {docs.get(f.name, '')}")
    return "train.* options:\n" + "\n".join(blocks)


HABITS_HELP = """Hydra flags:
  --cfg job|hydra|all   print the composed config (YAML) and exit; --resolve resolves interpolations
  -m, --multirun        sweep comma-separated values / range(a,b) / choice(...): one run per combination in
                        <train.run_dir>/<index>_<key=value,...>, then a summary table (exit 1 if any run failed)
  hydra.run.dir=PATH    = train.run_dir=PATH (hydra.sweep.dir too: the base directory of a -m sweep)
  shell completion:     eval "$(fdistill completion bash)\""""


# ---------------------------------------------------------------------------------------------------------- sweeps


@dataclass
class Job:
    """One combination of a sweep: its overrides, those that were swept (for its name) and its index."""

    index: int
    overrides: list[str]
    swept: list[str]

    def dirname(self) -> str:
        """``<index>_<key=value,...>`` with path separators replaced (a value may be a path)."""
        label = ",".join(self.swept)
        return re.sub(r"[/\\\s]", "_", f"{self.index}_{label}" if label else str(self.index))


def expand_sweeps(overrides: list[str]) -> list[Job]:
    """Every combination of the sweep overrides (Hydra's grammar: ``a,b``, ``range(0,3)``, ``choice(a,b)``), in
    Hydra's BasicSweeper order (the last override varies fastest). Raises UsageError for a bad override."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as error:
        raise UsageError(" ".join(str(error).split())) from error
    axes, swept_axes = [], []
    for override in parsed:
        if override.is_sweep_override():
            key = override.get_key_element()
            try:
                values = [f"{key}={value}" for value in override.sweep_string_iterator()]
            except HydraException as error:   # glob(...) needs the config search path: not supported here
                raise UsageError(f"{override.input_line!r}: {' '.join(str(error).split())}") from error
            axes.append(values)
            swept_axes.append(True)
        else:
            axes.append([override.input_line])
            swept_axes.append(False)
    return [Job(index, list(combination), [o for o, swept in zip(combination, swept_axes) if swept])
            for index, combination in enumerate(itertools.product(*axes))]


def quoted(value: str) -> str:
    """A value as a single-quoted string of Hydra's override grammar (a job dir holds '=' and ',')."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def summary_table(rows: list[tuple[Job, int, str]]) -> str:
    """A fixed-width table: index, exit code, run dir, swept overrides."""
    lines = [f"{'#':>3}  {'exit':>4}  {'run_dir':<40}  overrides"]
    lines += [f"{job.index:>3}  {code:>4}  {run_dir:<40}  {' '.join(job.swept)}" for job, code, run_dir in rows]
    return "\n".join(lines)


def run_multirun(prog: str, overrides: list[str], base_run_dir: str, run_one: Callable[[list[str]], int]) -> int:
    """Run every sweep combination in ``<base_run_dir>/<job dir>`` with ``run_one(overrides) -> exit code``,
    print the summary table, return 0 if every run exited 0, else 1. An exception in one run is reported on one line
    and the sweep goes on."""
    jobs = expand_sweeps(overrides)
    rows = []
    for job in jobs:
        run_dir = f"{base_run_dir.rstrip('/')}/{job.dirname()}"
        print(f"fdistill {prog} -m: [{job.index + 1}/{len(jobs)}] {' '.join(job.swept)} -> {run_dir}", flush=True)
        try:
            code = run_one([*job.overrides, f"train.run_dir={quoted(run_dir)}"])
        except Exception as error:   # noqa: BLE001  (one failed run must not lose the others' results)
            print(f"fdistill {prog} -m: run {job.index} failed: {type(error).__name__}: {error}", file=sys.stderr)
            code = 1
        rows.append((job, code, run_dir))
    print(summary_table(rows))
    failed = sum(code != 0 for _, code, _ in rows)
    print(f"fdistill {prog} -m: {len(rows) - failed}/{len(rows)} runs succeeded")
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------------------- main


def config_yaml(overrides: list[str], part: str, resolve: bool) -> str:
    """The composed config (``job``: without Hydra's own section, ``hydra``: only it, ``all``: both) as YAML."""
    from omegaconf import OmegaConf

    from ..config import compose

    if part != "job":   # Hydra's run dir is fdistill's train.run_dir: show the one that is used
        overrides = [*overrides, f"hydra.run.dir={compose(overrides).train.run_dir}"]
    cfg = compose(overrides, return_hydra_config=part != "job").cfg
    if part == "hydra":
        cfg = cfg.hydra
    return OmegaConf.to_yaml(cfg, resolve=resolve)


def run_command(prog: str, argv: list[str], usage: str, run_one: Callable[[list[str]], int],
                preset: Callable[[list[str]], list[str]] = list) -> int:
    """The shared ``main`` of ``fdistill train`` / ``distill``: Hydra's flags, then one run or a sweep.
    ``preset`` adds the command's default overrides (``distill``: its experiment); ``run_one(overrides)`` trains."""
    from ..config import ConfigError, compose

    try:
        line = parse_command_line(argv)
        if line.help:
            print(f"{usage}\n\n{HABITS_HELP}\n\n{train_options_help()}")
            return 0
        overrides = preset(line.overrides)
        jobs = expand_sweeps(overrides) if line.multirun else None
        if line.cfg is not None:
            for job in jobs or [Job(0, overrides, [])]:
                if jobs:
                    print(f"# job {job.index}: {' '.join(job.swept)}")
                print(config_yaml(job.overrides, line.cfg, line.resolve), end="")
            return 0
        if not line.multirun:
            return run_one(overrides)
        base_run_dir = compose(jobs[0].overrides).train.run_dir
    except (UsageError, ConfigError) as error:
        print(f"fdistill {prog}: {'config' if isinstance(error, ConfigError) else 'usage'} error: {error}",
              file=sys.stderr)
        return 2
    return run_multirun(prog, overrides, base_run_dir, run_one)
