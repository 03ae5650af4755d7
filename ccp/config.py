"""The configs shipped inside the package (``ccp/conf``) and the one way to compose them.

Every entry point and every in-process run (reproduce, the toy prior, the demo, tests) composes
from `CONF_DIR`, so an installed wheel finds the same configs as a checkout.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

# Absolute: Hydra would read a relative config_path as a Python package path when run as a module.
CONF_DIR = str(Path(__file__).resolve().parent / "conf")


def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def by_gpus(on_cpu, one_gpu, many_gpus):
    """``${ccp.by_gpus:A,B,C}`` in a config: A without a CUDA device, B with one, C with several
    (``trainer=auto``: the hardware picks cpu, gpu or ddp settings; a value set on the command line wins)."""
    count = cuda_device_count()
    return on_cpu if count == 0 else one_gpu if count == 1 else many_gpus


OmegaConf.register_new_resolver("ccp.by_gpus", by_gpus, replace=True)

MAX_DIRNAME = 120  # file systems refuse names over 255 bytes; keep well below with the job number in front


def short_dirname(name) -> str:
    """``${ccp.dirname:...}``: a sweep point's folder name from its overrides, cut and made unique by a
    hash of the whole when it is long (many overrides gave "File name too long")."""
    import hashlib

    name = str(name)
    if len(name) <= MAX_DIRNAME:
        return name
    return f"{name[:MAX_DIRNAME - 13]}-{hashlib.sha1(name.encode()).hexdigest()[:12]}"


OmegaConf.register_new_resolver("ccp.dirname", short_dirname, replace=True)


def run_name_suffix(family) -> str:
    """``${ccp.run_suffix:${prior.family}}``: ``_sdxl`` for a prior chosen as SDXL (prior=sdxl), so its runs
    never share a folder, nor resume checkpoints, with the SD v1.5 runs of the same dataset and method."""
    return "_sdxl" if str(family) == "sdxl" else ""


def class_prompt(template) -> str:
    """``${ccp.class_prompt:${template.template}}``: the prompt template without its token ("a photo of
    {token} face" -> "a photo of face"): what the concept is an instance of, DreamBooth's class prompt."""
    return " ".join(str(template).replace("{token}", " ").split())


# The weights every method samples with by default (its ``default_guidance``; Table 1's FID runs at them):
# the one default of ccp-train's validation and sample metrics, ccp-eval and ccp-reproduce, which read it
# as ``${ccp.default_weight:concept}``. ccp-sample's presets are recipes of the paper's figures instead.
DEFAULT_GUIDANCE_WEIGHTS = {"concept": 1.0, "control": 5.0}


def default_weight(term) -> float:
    """``${ccp.default_weight:concept}`` or ``${ccp.default_weight:control}``."""
    return DEFAULT_GUIDANCE_WEIGHTS[str(term)]


OmegaConf.register_new_resolver("ccp.default_weight", default_weight, replace=True)
OmegaConf.register_new_resolver("ccp.run_suffix", run_name_suffix, replace=True)
OmegaConf.register_new_resolver("ccp.class_prompt", class_prompt, replace=True)


class ConfigError(Exception):
    """Bad input found before any long compute; the message names the problem and the fix.

    The CLIs turn it into a one-line ``<prog>: error: ...`` exit."""


USAGE_ERROR_STATUS = 2  # argparse's exit status for bad command-line input


@contextlib.contextmanager
def exit_on_config_error(prog: str) -> Iterator[None]:
    """A `ConfigError` becomes ``<prog>: error: <message>`` on stderr and exit status 2, without a
    traceback; so does a full disk (a checkpoint that found no room), with status 1."""
    try:
        yield
    except ConfigError as err:
        raise _error_exit(prog, err, USAGE_ERROR_STATUS) from None
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise _error_exit(prog, err, 1) from None  # the run's own condition, not the command line's: status 1


def _error_exit(prog: str, err: BaseException, status: int) -> SystemExit:
    message = f"{prog}: error: {err}"
    print(message, file=sys.stderr, flush=True)
    stop = SystemExit(message)
    stop.code = status  # an int: Python prints nothing more; the text stays the message
    return stop


def compose(config_name: str | None, overrides: Sequence[str] = (), *, return_hydra_config: bool = False) -> DictConfig:
    """`config_name` of the packaged configs with Hydra `overrides`; also inside a running Hydra
    app (ccp-reproduce composes a ccp-train config per table cell), whose state is kept."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = with_experiments_composed(overrides) if config_name == "train" else list(overrides)
    outer = GlobalHydra.instance()
    running = outer.hydra
    outer.clear()  # Hydra allows one initialisation at a time
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return hydra_compose(config_name, overrides=overrides, return_hydra_config=return_hydra_config)
    finally:
        GlobalHydra.set_instance(outer)
        outer.hydra = running


# --- experiments: a recipe composed with a dataset, a method and a prior ---------------------------

# The experiment names of earlier versions, one file per dataset x method x prior, and the groups that
# compose each now: table1/animal_oft is experiment=table1 dataset=animal method=oft.
OLD_EXPERIMENT_FOLDERS = {  # old folder -> (experiment, prior); None: the prior the experiment names
    "table1": ("table1", None), "table1_sdxl": ("table1", "sdxl"), "tiny": ("tiny", None), "toy": ("toy", None)}
OLD_EXPERIMENT_DATASETS = ("face", "animal")  # the table1 files' prefixes, now dataset=
OLD_EXPERIMENT_FILES = {  # the names that were no dataset x method row
    "toy/prior": ["experiment=toy_prior"], "table1_sdxl/sdxl": ["prior=sdxl"]}
_announced: set[str] = set()


def experiment_overrides(name: str) -> list[str] | None:
    """The overrides an earlier experiment name stands for (``table1_sdxl/face_oft`` ->
    ``experiment=table1 dataset=face method=oft prior=sdxl``), or None where `name` is none."""
    if name in OLD_EXPERIMENT_FILES:
        return list(OLD_EXPERIMENT_FILES[name])
    folder, _, row = name.partition("/")
    if folder not in OLD_EXPERIMENT_FOLDERS or not row:
        return None
    experiment, prior = OLD_EXPERIMENT_FOLDERS[folder]
    dataset = None
    if experiment == "table1":
        dataset, _, row = row.partition("_")
        if dataset not in OLD_EXPERIMENT_DATASETS:
            return None
    if row not in group_options("method") or row == "text_to_image":
        return None
    return [f"experiment={experiment}", *([f"dataset={dataset}"] if dataset else []), f"method={row}",
            *([f"prior={prior}"] if prior else [])]


def old_experiment_names() -> list[str]:
    """Every earlier experiment name that still resolves (for suggestions and tests)."""
    # text_to_image and controlnet train a prior's parts; the one-file-per-row layout never had them
    methods = [m for m in group_options("method") if m not in ("text_to_image", "controlnet")]
    names = [f"{folder}/{d}_{m}" for folder in ("table1", "table1_sdxl") for d in OLD_EXPERIMENT_DATASETS for m in methods]
    names += [f"{folder}/{m}" for folder in ("tiny", "toy") for m in methods]
    return sorted([*names, *OLD_EXPERIMENT_FILES])


def with_experiments_composed(overrides: Sequence[str], *, announce: bool = False) -> list[str]:
    """`overrides` with an earlier experiment name (``experiment=table1/face_ours``, or a sweep of them
    over one dataset) written as the groups that compose it (`announce`: said once per name on stderr,
    as the command line does). A group the overrides set themselves wins over the one the old name
    implies, as it did over the old file."""
    lines = [str(o) for o in overrides]
    out: list[str] = []
    for line in lines:
        key, _, value = line.partition("=")
        names = value.split(",") if key == "experiment" and re.fullmatch(r"[\w/]+(,[\w/]+)*", value) else []
        composed = [experiment_overrides(n) for n in names]
        if not names or None in composed:
            out.append(line)
            continue
        given = {o.partition("=")[0] for o in lines if o != line}
        out.extend(o for o in _as_sweep(names, composed) if o.partition("=")[0] not in given)
        for name, new in zip(names, composed):
            if announce and name not in _announced:
                _announced.add(name)
                print(f"ccp: experiment={name} is written {' '.join(new)} now; the old name still works",
                      file=sys.stderr, flush=True)
    return out


def _as_sweep(names: list[str], composed: list[list[str]]) -> list[str]:
    """One override per group: a single value, or a sweep where the names differ in it. Names that are
    no grid of their groups (face_ours with animal_oft) have no such form: run one sweep per dataset."""
    keys = [o.partition("=")[0] for o in composed[0]]
    values: dict[str, list[str]] = {}
    for overrides in composed:
        if [o.partition("=")[0] for o in overrides] != keys:
            raise ConfigError(f"experiment={','.join(names)}: these experiments are no longer one group; "
                              f"sweep one experiment at a time, e.g. {' '.join(composed[0])}")
        for o in overrides:
            key, _, value = o.partition("=")
            values.setdefault(key, [])
            if value not in values[key]:
                values[key].append(value)
    grid = 1
    for chosen in values.values():
        grid *= len(chosen)
    if grid != len(set(names)):
        raise ConfigError(f"experiment={','.join(names)}: not every combination of "
                          + ", ".join(f"{k}={','.join(v)}" for k, v in values.items() if len(v) > 1)
                          + "; run one sweep per dataset (e.g. experiment=table1 dataset=face method=ours,oft)")
    return [f"{key}={','.join(chosen)}" for key, chosen in values.items()]


def with_output_dir(cfg: DictConfig, output_dir: str | Path) -> DictConfig:
    """A copy of `cfg` whose ``paths.output_dir`` is `output_dir` (outside Hydra it has no value)."""
    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    OmegaConf.update(cfg, "paths.output_dir", str(output_dir), force_add=True)
    return cfg


def plain(node) -> dict:
    """A config mapping (possibly empty or absent) as a plain dict: an empty DictConfig is falsy,
    so ``node or {}`` would hand OmegaConf a plain dict."""
    return {} if node is None else OmegaConf.to_container(node, resolve=True)


# --- the command line, checked before Hydra composes and runs the job ----------------------------

# Nodes whose entries the user names: a new key there is read by the code that walks the node
# (``.**``: at any depth below it). An empty mapping in a config (``loras: {}``) is open as well:
# its entries are added with ``+``.
OPEN_NODES: dict[str, dict[str, str]] = {
    "sample": {"guidance.terms": "guidance terms by name; ccp.pipelines.run checks every term"},
    "reproduce": {
        "rows": "variant rows by name; ccp.reproduce.config checks each row",
        "data": "datasets by name, picked with datasets=[...]",
        "train_settings.**": "merged into the ccp-train config of every table cell",
        "data.*.train_settings.**": "merged into that dataset's ccp-train configs",
        "rows.*.train_settings.**": "merged into that row's ccp-train configs",
        "guidance.per_method": "guidance weights by method or row",
        "weight_search.grid": "weight grids by row or method; ccp.reproduce.config checks each",
        "text_alignment.attributes": "the attributes each prompt asks for",
        "prior.toy_settings": "ToyPriorSettings keywords, which refuses unknown ones",
        "classifier.settings": "train_digit_classifier keywords, which refuses unknown ones",
    },
    "study": {"study.methods": "the methods' sample folders by name"},
    "launch": {"target.gpu_types": "the target's GPU types by name"},
}
# Keys the code reads that no config sets, because unset means something.
READ_UNSET_KEYS = {"logger.wandb.group": "ccp.tracking.group_for: unset, a job joins its own experiment's group"}
JOB_FOLDERS = {False: "hydra.run.dir", True: "hydra.sweep.dir"}  # by multirun
# The command line as the user typed it, before an old experiment name was rewritten for Hydra:
# what a resume command repeats.
TYPED_ARGV: list[str] = []


def run_checked(prog: str, config_name: str, hydra_main: Callable[[], None]) -> None:
    """A Hydra entry point: the command line checked (`check_command_line`), then `hydra_main`,
    the ``@hydra.main`` function, which reads the same command line."""
    TYPED_ARGV[:] = sys.argv
    with exit_on_config_error(prog):
        if config_name == "train":  # the one config with experiments; Hydra reads them from sys.argv
            sys.argv[1:] = with_experiments_composed(sys.argv[1:], announce=True)
        check_command_line(config_name, sys.argv[1:])
    hydra_main()


def check_command_line(config_name: str, argv: Sequence[str], *, job_folder: bool = True) -> None:
    """Refuse, with a `ConfigError` naming the fix, a command line that Hydra would run wrongly or
    fail on only after the job has started: a mistyped config-group choice (every choice of a sweep),
    a key the config lacks, a key added with ``+``/``++`` that nothing reads, and (`job_folder`) a
    job folder that cannot be created. Hydra's own flags pass through; with ``--help``, ``--info``,
    another config path or dir, nothing is checked. A sweep is checked at its first value."""
    args = _hydra_arguments(argv)
    if args is None:
        return
    config_name = args.config_name or config_name
    overrides = _parse_overrides(args.overrides)
    own = [o for o in overrides if not o.is_hydra_override()]
    groups = [o for o in own if _is_group(o.key_or_group)]
    keys = [o for o in own if not _is_group(o.key_or_group)]
    for override in groups:
        _check_group_choices(override)
    if keys:
        # the structure the keys are checked against: groups chosen, no key changed or added yet
        base = _compose_or_refuse(config_name, [_first_value(o) for o in groups])
        _check_keys(config_name, base, keys)
    if job_folder and not args.cfg:
        folder_key = JOB_FOLDERS[bool(args.multirun)]
        given = [o.input_line for o in overrides if o.key_or_group == folder_key and not o.is_sweep_override()]
        cfg = _compose_or_refuse(config_name, [*(_first_value(o) for o in own), *given], return_hydra_config=True)
        _check_job_folder(cfg, folder_key)


class _ArgumentError(Exception):
    pass


def _hydra_arguments(argv: Sequence[str]):
    """Hydra's own reading of the command line, or None where Hydra alone acts (help, version,
    info, shell completion, another config path or dir, a rerun) or refuses the arguments."""
    from hydra._internal.utils import get_args_parser

    if "--version" in argv:
        return None
    parser = get_args_parser()

    def refuse(message):
        raise _ArgumentError(message)

    parser.error = refuse  # Hydra reports bad flags itself
    try:
        args = parser.parse_args(list(argv))
    except _ArgumentError:
        return None
    if (args.help or args.hydra_help or args.shell_completion or args.info or args.experimental_rerun
            or args.config_path or args.config_dir):
        return None
    return args


def _parse_overrides(lines: Sequence[str]) -> list:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        return OverridesParser.create().parse_overrides(list(lines))
    except OverrideParseException as err:
        raise ConfigError(f"{err.override}: {_one_line(err)}") from None


def _is_group(name: str) -> bool:
    return bool(name) and (Path(CONF_DIR) / name).is_dir()


def group_options(group: str) -> list[str]:
    """Every option of a config group, nested ones by their path (``table1/face_ours``)."""
    root = Path(CONF_DIR) / group
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))


def _choices(override) -> list:
    """The values of an override: one, or each of a choice or range sweep."""
    from hydra.core.override_parser.types import ValueType

    if override.value_type in (ValueType.GLOB_CHOICE_SWEEP, ValueType.INTERVAL_SWEEP):
        return []  # a glob picks from the options itself; an interval is no group choice
    if override.is_discrete_sweep():
        return list(override.sweep_string_iterator())
    value = override.value()
    return value if isinstance(value, list) else [value]


def _check_group_choices(override) -> None:
    if override.is_delete():
        return
    group = override.key_or_group
    options = group_options(group)
    for value in _choices(override):
        if value is None or value == "null" or str(value) in options:
            continue
        close = difflib.get_close_matches(str(value), options, n=1, cutoff=0.6)
        guess = f"did you mean {override.get_key_element()}={close[0]}? " if close else ""
        old = difflib.get_close_matches(str(value), old_experiment_names(), n=1, cutoff=0.8) if group == "experiment" else []
        if old:  # a mistyped earlier name: suggest what it is written now
            guess = f"did you mean {' '.join(experiment_overrides(old[0]))}? "
        raise ConfigError(f"{override.input_line}: {group} has no option {value}; {guess}"
                          f"Options of {group}: {', '.join(options)}")


def _first_value(override) -> str:
    """The override with a sweep replaced by its first value (a config to check keys against)."""
    from hydra.core.override_parser.types import ValueType

    if override.is_delete() or not override.is_sweep_override():
        return override.input_line
    key = override.get_key_element()
    if override.value_type == ValueType.GLOB_CHOICE_SWEEP:
        first = next(iter(override.value().filter(group_options(override.key_or_group))), None)
    elif override.value_type == ValueType.INTERVAL_SWEEP:
        first = override.value().start
    else:
        first = next(iter(override.sweep_string_iterator()), None)
    return override.input_line if first is None else f"{key}={first}"


def _one_line(err: BaseException) -> str:
    """Hydra's message without the search path it appends, and OmegaConf's reason, on one line."""
    text = str(err).split("\n\nConfig search path")[0]
    cause = err.__cause__
    if cause is not None and type(cause).__module__.startswith("omegaconf"):
        text += "\n" + str(cause).splitlines()[0]
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _compose_or_refuse(config_name: str, overrides: Sequence[str], return_hydra_config: bool = False) -> DictConfig:
    try:
        return compose(config_name, overrides, return_hydra_config=return_hydra_config)
    except Exception as err:  # Hydra's composition errors name the override; one line, not a traceback
        raise ConfigError(_one_line(err)) from None


def _children(node) -> list[str]:
    """The keys of a mapping node without resolving anything; none for a value, list or null."""
    if not isinstance(node, DictConfig) or node._is_none() or node._is_missing() or node._is_interpolation():
        return []
    return [str(k) for k in node.keys()]


def _walk(cfg: DictConfig, parts: list[str]) -> list:
    """The nodes along `parts` that exist (the root first); an interpolated node on the way ends the
    walk as if the rest existed, since only its value can say."""
    nodes = [cfg]
    for i, part in enumerate(parts):
        node = nodes[-1]
        if node._is_interpolation():
            return nodes + [None] * (len(parts) - i)
        if isinstance(node, ListConfig) and part.isdigit() and int(part) < len(node):
            nodes.append(node._get_node(int(part)))
        elif part in _children(node):
            nodes.append(node._get_node(part))
        else:
            break
    return nodes


def _dotted_keys(node, prefix: str = "") -> list[str]:
    keys = []
    for key in _children(node):
        path = f"{prefix}{key}"
        keys.append(path)
        keys.extend(_dotted_keys(node._get_node(key), path + "."))
    return keys


def _nearest_key(cfg: DictConfig, parts: list[str], nodes: list, candidates: list[str]) -> str | None:
    """The existing key closest to a mistyped one: its first unknown part among its siblings, else
    the whole dotted key among all keys."""
    found = len(nodes) - 1
    close = difflib.get_close_matches(parts[found], _children(nodes[-1]), n=1, cutoff=0.6)
    if close:
        guess = ".".join([*parts[:found], close[0], *parts[found + 1:]])
        if guess in candidates:
            return guess
    same_depth = [k for k in candidates if k.count(".") == len(parts) - 1]
    close = difflib.get_close_matches(".".join(parts), same_depth, n=1, cutoff=0.8)
    return close[0] if close else None


def _is_read(config_name: str, key: str, parts: list[str], nodes: list) -> bool:
    """Whether a new key is read: a key the code reads unset, an entry of an open node, or a
    keyword of a node built from its ``_target_`` (whose constructor refuses unknown ones)."""
    if key in READ_UNSET_KEYS:
        return True
    deepest, path = nodes[-1], ".".join(parts[:len(nodes) - 1])
    if isinstance(deepest, DictConfig) and not _children(deepest) and not deepest._is_none():
        return True
    if path and any(_is_open(path, pattern) for pattern in OPEN_NODES.get(config_name, {})):
        return True
    return any("_target_" in _children(node) for node in nodes[1:])


def _is_open(path: str, pattern: str) -> bool:
    from fnmatch import fnmatchcase

    if pattern.endswith(".**"):
        pattern = pattern[:-3]
        return fnmatchcase(path, pattern) or fnmatchcase(path, pattern + ".*")
    return fnmatchcase(path, pattern)


def _check_keys(config_name: str, base: DictConfig, overrides: list) -> None:
    candidates = _dotted_keys(base)
    new: list[str] = []  # keys added or set to a mapping by an earlier override: what lies under them is new too
    for override in overrides:
        key = override.key_or_group
        if any(key == k or key.startswith(k + ".") for k in new):
            continue
        parts = key.split(".")
        nodes = _walk(base, parts)
        added = override.is_add() or override.is_force_add()
        if len(nodes) <= len(parts) and not (added and _is_read(config_name, key, parts, nodes)):
            raise ConfigError(_unknown_key(config_name, override, parts, nodes, candidates, base))
        if added or isinstance(override.value(), dict):
            new.append(key)


def _unknown_key(config_name: str, override, parts: list[str], nodes: list, candidates: list[str],
                 base: DictConfig) -> str:
    key, added = ".".join(parts), override.is_add() or override.is_force_add()
    parent = ".".join(parts[:len(nodes) - 1])
    siblings = _children(nodes[-1])
    nearest = _nearest_key(base, parts, nodes, candidates)
    listed = 0 < len(siblings) <= (8 if nearest else 20)  # the keys there, unless a guess says enough
    where = f" ({parent or 'the config'} has: {', '.join(siblings)})" if listed else ""
    if added:
        what = f"nothing reads {key}{where}, and {parent or 'the config'} takes no new keys"
    else:
        what = f"the config has no {key}{where}"
    value = "" if override.is_delete() else "=" + override.get_value_string()
    if nearest:
        fix = f"; did you mean {'~' if override.is_delete() else ''}{nearest}{value}?"
    elif not added and not override.is_delete() and _is_read(config_name, key, parts, nodes):
        fix = f"; add the entry with +{key}{value}"
    else:
        fix = "" if listed else "; see the config's keys with --cfg job"
    return f"{override.input_line}: {what}{fix}"


def _source_key(cfg: DictConfig, key: str) -> str:
    """The key a path value comes from: followed through a leading ``${other.key}`` while there is one
    (``hydra.run.dir: ${paths.log_dir}/train/...`` -> paths.log_dir)."""
    for _ in range(10):
        nodes = _walk(cfg, key.split("."))
        raw = nodes[-1]._value() if len(nodes) == len(key.split(".")) + 1 and nodes[-1] is not None else None
        leading = re.match(r"\$\{([\w.]+)\}", raw) if isinstance(raw, str) else None
        if leading is None:
            return key
        key = leading.group(1)
    return key


def _check_job_folder(cfg: DictConfig, folder_key: str) -> None:
    """The folder Hydra creates for the job, or its nearest existing parent, must be a writable folder
    (Hydra itself fails with two chained tracebacks)."""
    from hydra.core.utils import setup_globals

    setup_globals()  # ${now:...} in the folder names
    try:
        folder = OmegaConf.select(cfg, folder_key, throw_on_resolution_failure=True)
    except Exception:  # noqa: BLE001 - a value only the running job can resolve; Hydra will say
        return
    if not folder:
        return
    target = Path(str(folder)).absolute()
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.is_dir() and os.access(existing, os.W_OK | os.X_OK):
        return
    problem = f"{existing} is a file" if existing.exists() and not existing.is_dir() else f"{existing} is not writable"
    key = _source_key(cfg, folder_key)
    raise ConfigError(f"{key}={OmegaConf.select(cfg, key)}: the job writes into {target}, but {problem}; "
                      f"set {key} to a folder you can write to")
