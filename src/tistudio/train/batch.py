"""Many embeddings in one command: a plan of training jobs, from a TOML file or a folder of prepared sets, run one
after another in one process (each model loaded once), or one job per process as a cluster's array jobs.

A plan file (``tistudio train-many jobs.toml``)::

    [defaults]                   # any train option, shared by every job; a job's own keys win
    model = "sdxl-base.safetensors"
    max_steps = 3000

    [[job]]
    embedding = "alice"          # created where it does not exist yet, from init_text and vectors
    dataset = "prepared/alice"
    init_text = "woman"
    vectors = 4

    [[job]]
    embedding = "bob"
    dataset = "prepared/bob"
    learning_rate = "0.003"

Paths in the file (dataset, embeddings_dir, run_dir, template, and model where that file or folder exists there)
are relative to the file's folder, so an array job started anywhere finds them; embeddings go to the file's
``embeddings/`` and runs to its ``runs/NAME`` unless the file says otherwise. A folder of prepared sets
(``tistudio train-many prepared/``) is a plan of one job per set, named after the set, with the command line's
options for all of them.

Every job is checked before any model is loaded. Running the plan again continues it: a finished job is skipped,
a stopped one resumes from its last save. A job that fails is reported and the next one runs; the outcome of each
is returned (and the CLI exits non-zero if any failed).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tistudio.config import CreateOptions, ModelOptions, TrainOptions, from_dict, validate_create, validate_train
from tistudio.errors import DatasetError, EmbeddingError, OptionError, TistudioError
from tistudio.progress import Progress

log = logging.getLogger(__name__)

CREATE_KEYS = ("init_text", "vectors")  # create's options a job may give, for an embedding that does not exist
PATH_KEYS = ("dataset", "embeddings_dir", "run_dir")
MAX_JOBS = 10_000
MAX_PLAN_BYTES = 4 * 1024 * 1024  # 10,000 jobs of a few options each fit in well under this
MAX_PLAN_NESTING = 8  # arrays and inline tables inside each other (a plan needs 1 or 2)
MAX_KEY_PARTS = 8  # parts of a dotted key (tomllib's memory grows with the square of it)


@dataclass(frozen=True)
class PlannedJob:
    """One embedding of a plan: how to train it, and how to create it if its file does not exist."""

    index: int  # 0-based place in the plan (an array job's task id)
    train: TrainOptions
    create: CreateOptions

    @property
    def name(self) -> str:
        return self.train.embedding


@dataclass(frozen=True)
class Outcome:
    job: PlannedJob
    status: str  # trained, finished (nothing left to train), stopped, failed
    message: str
    step: int | None = None


# ----------------------------------------------------------------------------------------------------------------
# Plans


def load_plan(path: Path, overrides: Mapping[str, Any] | None = None) -> list[PlannedJob]:
    """The jobs of a plan file, each checked. `overrides` (the command line's options) replace the file's
    [defaults]; a job's own keys win over both."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    try:
        text = read_plan_text(Path(path))
        check_plan_shape(text, Path(path).name)
        data = tomllib.loads(text)
    except OSError as exc:
        raise OptionError(
            "plan",
            str(path),
            f"cannot be read ({exc.strerror or exc}); give a jobs .toml file or a folder of prepared sets",
        ) from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise OptionError("plan", str(path), f"is not valid TOML ({exc}); see `tistudio train-many --help`") from exc
    unknown = sorted(set(data) - {"defaults", "job"})
    if unknown:
        raise OptionError(
            f"{Path(path).name}: [{unknown[0]}]", data[unknown[0]], "a plan has [defaults] and [[job]] tables only"
        )
    defaults, jobs = data.get("defaults", {}), data.get("job", [])
    if not isinstance(defaults, dict) or not isinstance(jobs, list) or not all(isinstance(j, dict) for j in jobs):
        raise OptionError(Path(path).name, "", "write [defaults] as one table and each job as a [[job]] table")
    if not jobs:
        raise OptionError(f"{Path(path).name}: job", 0, "add at least one [[job]] table with embedding and dataset")
    if len(jobs) > MAX_JOBS:
        raise OptionError(f"{Path(path).name}: job", len(jobs), f"a plan has at most {MAX_JOBS:,} jobs")
    base = Path(path).resolve().parent
    given = resolve_paths(dict(overrides or {}), Path.cwd())  # the command line's paths are the shell's
    plan = [
        make_job(i, {**defaults, **given, **job}, base, where=f"{Path(path).name} job {i + 1}")
        for i, job in enumerate(jobs)
    ]
    check_distinct(plan)
    return plan


def read_plan_text(path: Path) -> str:
    """A plan file's text: a regular file (a named pipe would wait forever) of at most MAX_PLAN_BYTES."""
    import stat

    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise OptionError(
            "plan", str(path), "is not a regular file; give a jobs .toml file or a folder of prepared sets"
        )
    if info.st_size > MAX_PLAN_BYTES:
        raise OptionError("plan", str(path), f"is {info.st_size:,} bytes; a plan is at most {MAX_PLAN_BYTES:,}")
    with open(path, "rb") as handle:
        return handle.read(MAX_PLAN_BYTES + 1).decode("utf-8")


def check_plan_shape(text: str, where: str) -> None:
    """Refuse, before TOML is parsed, arrays or inline tables nested deeper than MAX_PLAN_NESTING (the parser
    recurses into them) and dotted keys of more than MAX_KEY_PARTS parts (its memory grows with their square).
    A small scanner: strings and comments are skipped; a key runs from a line's start, or from '{' or ',' in an
    inline table, to its '='; a table header from its '[' to its ']'."""
    stack: list[str] = []
    quote, in_key, parts, line = "", True, 1, 1
    i = 0
    while i < len(text):
        char = text[i]
        if quote:  # inside a string: find its end (basic strings have escapes)
            if char == "\\" and quote[0] == '"':
                i += 2
                continue
            if text.startswith(quote, i):
                i += len(quote)
                quote = ""
                continue
            line += char == "\n"
            i += 1
            continue
        if char in "\"'":
            quote = char * 3 if text.startswith(char * 3, i) else char
            i += len(quote)
            continue
        if char == "#":
            end = text.find("\n", i)
            i = len(text) if end < 0 else end
            continue
        if char == "\n":
            line += 1
            in_key, parts = not stack, 1
        elif char == "." and in_key:
            parts += 1
            if parts > MAX_KEY_PARTS:
                raise OptionError("plan", f"{where} line {line}", f"a dotted key has more than {MAX_KEY_PARTS} parts")
        elif char == "=" or (char == "]" and in_key and not stack):
            in_key = False
        elif char in "[{" and not (in_key and char == "[" and not stack):
            stack.append(char)
            if len(stack) > MAX_PLAN_NESTING:
                raise OptionError(
                    "plan", f"{where} line {line}", f"arrays and tables nest at most {MAX_PLAN_NESTING} deep"
                )
            in_key, parts = char == "{", 1
        elif char in "]}" and stack:
            stack.pop()
        elif char == "," and stack and stack[-1] == "{":
            in_key, parts = True, 1
        i += 1


def plan_from_folder(folder: Path, options: Mapping[str, Any]) -> list[PlannedJob]:
    """One job per prepared set (a subfolder) of `folder`, named after it, with `options` for every job."""
    sets = (
        sorted(p for p in Path(folder).iterdir() if p.is_dir() and not p.name.startswith("."))
        if Path(folder).is_dir()
        else []
    )
    if not sets:
        raise DatasetError(
            f"{folder} holds no folders of photos; give a folder with one prepared set per "
            "embedding (e.g. prepared/alice, prepared/bob) or a jobs .toml file"
        )
    plan = [
        make_job(i, {**options, "embedding": p.name, "dataset": str(p)}, Path.cwd(), where=f"set {p.name}")
        for i, p in enumerate(sets)
    ]
    check_distinct(plan)
    return plan


def make_job(index: int, values: dict[str, Any], base: Path, where: str) -> PlannedJob:
    """A job's options from its table (paths taken relative to `base`), checked; errors say which job."""
    try:
        values = dict(values)
        create_values = {key: values.pop(key) for key in CREATE_KEYS if key in values}
        values = resolve_paths(values, base)
        name = str(values.get("embedding", ""))
        values.setdefault("embeddings_dir", str(base / "embeddings"))
        values.setdefault("run_dir", str(base / "runs" / name) if name else "")
        train = from_dict(TrainOptions, values)
        validate_train(train)
        model = {f.name: getattr(train, f.name) for f in dataclasses.fields(ModelOptions)}
        create = from_dict(
            CreateOptions, {**model, **create_values, "name": train.embedding, "embeddings_dir": train.embeddings_dir}
        )
        validate_create(create)
        if not Path(train.dataset).is_dir():
            raise OptionError("dataset", train.dataset, "no such folder; give the folder of the job's photos")
    except OptionError as exc:
        raise OptionError(f"{where}: {exc.field}", exc.value, exc.fix) from exc
    except TistudioError as exc:
        raise type(exc)(f"{where}: {exc}") from exc
    return PlannedJob(index=index, train=train, create=create)


def resolve_paths(values: dict[str, Any], base: Path) -> dict[str, Any]:
    out = dict(values)
    for key in PATH_KEYS:
        if isinstance(out.get(key), str) and out[key]:
            out[key] = str(base / Path(out[key]).expanduser())
    template = out.get("template")
    if isinstance(template, str) and (base / template).is_file():
        out["template"] = str(base / template)
    model = out.get("model")
    if isinstance(model, str) and model and (base / Path(model).expanduser()).exists():
        out["model"] = str(base / Path(model).expanduser())
    return out


def check_distinct(plan: list[PlannedJob]) -> None:
    """Two jobs of one plan must not train the same embedding or share a run folder (they would overwrite each
    other's files, at the same time in an array job)."""
    seen: dict[Any, int] = {}
    for job in plan:
        embedding = (str(Path(job.train.embeddings_dir).resolve()), job.name)
        if embedding in seen:
            raise OptionError(
                f"job {job.index + 1}: embedding",
                job.name,
                f"job {seen[embedding] + 1} trains it too; give each job its own embedding name",
            )
        run = str(Path(job.train.run_dir).resolve())
        if run in seen:
            raise OptionError(
                f"job {job.index + 1}: run_dir",
                job.train.run_dir,
                f"job {seen[run] + 1} uses it too; leave run_dir out (each job gets runs/NAME beside the plan)",
            )
        seen[embedding] = seen[run] = job.index


def select(plan: list[PlannedJob], index: int | None = None, names: tuple[str, ...] = ()) -> list[PlannedJob]:
    """The jobs to run here: one by its 0-based index (an array job's task id), or those named, or all."""
    if index is not None:
        if not 0 <= index < len(plan):
            raise OptionError(
                "index",
                index,
                f"the plan has {len(plan)} jobs: use 0 to {len(plan) - 1} (e.g. a "
                f"Slurm array --array=0-{len(plan) - 1})",
            )
        return [plan[index]]
    if names:
        missing = sorted(set(names) - {job.name for job in plan})
        if missing:
            raise OptionError(
                "only", missing[0], f"no job trains it; the plan's embeddings are {', '.join(job.name for job in plan)}"
            )
        return [job for job in plan if job.name in names]
    return plan


# ----------------------------------------------------------------------------------------------------------------
# Running


class Models:
    """The model of the job at hand, loaded once for consecutive jobs that use the same one."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir
        self.key: tuple[Any, ...] | None = None
        self.model: Any = None

    def get(self, options: ModelOptions) -> Any:
        from tistudio.models.loading import load_model

        key = (options.model, options.device, options.precision, options.prediction_type)
        if key != self.key:
            self.model = None  # free the last one first
            self.model = load_model(
                ModelOptions(**{f.name: getattr(options, f.name) for f in dataclasses.fields(ModelOptions)}),
                self.cache_dir,
            )
            self.key = key
        return self.model


def run_plan(
    jobs: list[PlannedJob],
    *,
    cache_dir: Path,
    stop: threading.Event | None = None,
    on_progress: Callable[[PlannedJob, Progress], None] | None = None,
    on_outcome: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """Train the jobs in order. A stop (Ctrl-C) ends the current job at its next step, saved, and starts no more."""
    stop = stop or threading.Event()
    models = Models(cache_dir)
    outcomes: list[Outcome] = []
    for job in jobs:
        if stop.is_set():
            break
        log.info("job %d of %d: %s", len(outcomes) + 1, len(jobs), job.name)
        report = (lambda p, job=job: on_progress(job, p)) if on_progress else None
        try:
            outcome = run_job(job, models, cache_dir, stop, report)
        except TistudioError as exc:  # the outcome carries it; the next job runs
            outcome = Outcome(job, "failed", str(exc))
        outcomes.append(outcome)
        if on_outcome:
            on_outcome(outcome)
    return outcomes


def run_job(
    job: PlannedJob,
    models: Models,
    cache_dir: Path,
    stop: threading.Event,
    on_progress: Callable[[Progress], None] | None,
) -> Outcome:
    """One job: create its embedding if it does not exist, then train (or resume) it; a finished one loads nothing."""
    from tistudio.embeddings.files import find_embedding_file
    from tistudio.train.create import create_embedding
    from tistudio.train.loop import resume_point, train

    try:
        find_embedding_file(job.train.embedding, job.train.embeddings_dir)
    except EmbeddingError:  # not there yet
        create_embedding(job.create, cache_dir=cache_dir, model=models.get(job.create))
    else:
        finished = resume_point(job.train).finished
        if finished:
            return Outcome(job, "finished", finished)
    result = train(job.train, cache_dir=cache_dir, model=models.get(job.train), on_progress=on_progress, stop=stop)
    return Outcome(job, "stopped" if result.stopped else "trained", result.message, result.step)
