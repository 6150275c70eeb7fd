"""The ``tistudio`` command: demo, prepare, create, train, use-step, generate, serve, inspect, convert.

Flags are generated from the options dataclasses in config.py, so the CLI, the API and the web UI offer the
same options with the same defaults. Errors the user can fix are one line on stderr and exit code 2. During
training, Ctrl-C (or SIGTERM) finishes the current step, saves, and exits 0; a second Ctrl-C aborts at once.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tistudio import __version__
from tistudio.config import CreateOptions, GenerateOptions, ModelOptions, PrepareOptions, TrainOptions
from tistudio.errors import OptionError, TistudioError, one_line
from tistudio.progress import Event, Progress

log = logging.getLogger("tistudio")

# Extra spellings people know from A1111 and the issue tracker.
ALIASES = {
    "negative_prompt": ["--negative"],
    "embeddings_dir": ["--embeddings"],
    "learning_rate": ["--lr"],
    "gradient_accumulation": ["--grad-accum"],
    "init_text": ["--init"],
}
TRAIN_ALIASES = {"max_steps": ["--steps"]}
ENV_DEFAULTS = {"model": "TISTUDIO_MODEL"}


def default_cache_dir() -> Path:
    if os.environ.get("TISTUDIO_CACHE"):
        return Path(os.environ["TISTUDIO_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tistudio"


def add_options(
    parser: argparse.ArgumentParser, cls: type, skip: Sequence[str] = (), defaults: Mapping[str, Any] | None = None
) -> None:
    """One flag per dataclass field (positional where the field says so); defaults overrides the fields'."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        meta = f.metadata
        help_text = meta.get("help", "")
        default = (defaults or {}).get(f.name, f.default)
        if f.name in ENV_DEFAULTS and os.environ.get(ENV_DEFAULTS[f.name]) and default is not argparse.SUPPRESS:
            default = os.environ[ENV_DEFAULTS[f.name]]
            help_text += f" (default from ${ENV_DEFAULTS[f.name]})"
        if meta.get("positional"):
            parser.add_argument(f.name, help=help_text)
            continue
        flags = ["--" + f.name.replace("_", "-"), *ALIASES.get(f.name, [])]
        if cls is TrainOptions:
            flags += TRAIN_ALIASES.get(f.name, [])
        if isinstance(f.default, bool):
            parser.add_argument(*flags, dest=f.name, action="store_true", default=default, help=help_text)
            continue
        kind = type(f.default)
        shown = "" if default in ("", None) else f" (default: {default})"
        # a field with its own check (samplers match regardless of case) gets its one-line error from validate()
        choices = None if meta.get("check") else meta.get("choices")
        parser.add_argument(
            *flags,
            dest=f.name,
            type=kind,
            default=default,
            metavar=f.name.upper(),
            choices=choices,
            help=help_text + shown,
        )


def options_from(args: argparse.Namespace, cls: type) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})


def quiet_third_party() -> None:
    """Keep diffusers' and transformers' own progress bars and notices off the terminal."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


class TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


@contextlib.contextmanager
def cli_logging(verbosity: int) -> Iterator[None]:
    """The library's log lines on stderr (through tqdm) while the command runs; the logger as it was after."""
    handler = TqdmHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("tistudio")
    before = (root.handlers[:], root.propagate, root.level)
    root.handlers[:] = [handler]
    root.propagate = False
    root.setLevel({-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG))
    try:
        yield
    finally:
        root.handlers[:], root.propagate = before[0], before[1]
        root.setLevel(before[2])


@contextlib.contextmanager
def stop_on_signals(announce: bool = True) -> Iterator[threading.Event]:
    """First Ctrl-C/SIGTERM: finish the step, save, exit 0. Second Ctrl-C: abort now. Handlers restored after.
    A SIGTERM after the first signal changes nothing: torchrun's agent sends one to every process right after a
    Ctrl-C reaches them all, and they should still save."""
    stop = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set() and signum == signal.SIGTERM:
            return
        if stop.is_set():
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        stop.set()
        if not announce:
            return
        from tqdm import tqdm

        tqdm.write("tistudio: stopping after this step and saving (press Ctrl-C again to abort now)", file=sys.stderr)

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def close_bars() -> None:
    """Close the progress bars a failed job left open (each ends its line)."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


class ProgressBar:
    """A job's Progress (progress.py) as one tqdm bar on stderr: opened at START or the first STEP (so errors before
    it print on a clean line), updated at each STEP with the loss and learning rate where there are any, closed at
    DONE, STOPPED or the last unit. ENCODE's words are logged; previews and copies at debug level."""

    def __init__(self, desc: str, unit: str, *, leave: bool = True) -> None:
        self.desc, self.unit, self.leave = desc, unit, leave
        self.bar: Any = None

    def open(self, total: int, initial: int = 0) -> None:
        from tqdm import tqdm

        self.close()
        self.bar = tqdm(
            total=total,
            initial=initial,
            unit=self.unit,
            desc=self.desc,
            dynamic_ncols=True,
            file=sys.stderr,
            leave=self.leave,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __call__(self, progress: Progress) -> None:
        event = progress.event
        if event == Event.START:
            self.open(progress.total, progress.step)
        elif event == Event.STEP:
            if self.bar is None:
                self.open(progress.total)
            self.bar.update(progress.step - self.bar.n)
            if progress.lr or progress.loss is not None:
                postfix = {"lr": f"{progress.lr:.2g}", "epoch": progress.epoch}
                if progress.loss is not None:
                    postfix["loss"] = f"{progress.loss:.4f}"
                self.bar.set_postfix(postfix, refresh=False)
            if progress.step >= progress.total:
                self.close()
        elif event in (Event.PREVIEW, Event.SAVE) and progress.path:
            log.debug("%s: %s", event, progress.path)
        elif event in (Event.DONE, Event.STOPPED):
            self.close()
        elif event == Event.ENCODE:
            log.info("%s", progress.message)


# ----------------------------------------------------------------------------------------------------------------
# Commands


def cmd_demo(args: argparse.Namespace) -> int:
    from tistudio.demo.run import run_demo

    with stop_on_signals() as stop:
        result = run_demo(
            Path(args.out),
            cache_dir=args.cache_dir,
            steps=args.demo_steps,
            family=args.family,
            on_progress=ProgressBar("training", "step"),
            stop=stop,
        )
    print(result.summary())
    return 0


def cmd_create(args: argparse.Namespace) -> int:
    from tistudio.train.create import create_embedding

    path = create_embedding(options_from(args, CreateOptions), cache_dir=args.cache_dir)
    print(path)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train; under torchrun or accelerate launch, one of the run's processes (process 0 alone shows progress)."""
    from tistudio.train.loop import train
    from tistudio.train.parallel import Parallel

    options = options_from(args, TrainOptions)
    parallel = Parallel.from_environment()
    if not parallel.main:
        logging.getLogger("tistudio").setLevel(logging.WARNING)
    with stop_on_signals(announce=parallel.main) as stop:
        result = train(
            options,
            cache_dir=args.cache_dir,
            stop=stop,
            parallel=parallel,
            on_progress=ProgressBar("training", "step") if parallel.main else None,
        )
    if parallel.main:
        for path, reason in result.skipped_images:
            log.warning("skipped %s: %s", path, reason)
        print(f"{result.message}: {result.embedding_path} (run folder {result.run_dir})")
    return 0


def cmd_train_many(args: argparse.Namespace) -> int:
    """A plan of embeddings: all of it here one after another, or (--index) one job of it, e.g. a Slurm array's."""
    from tistudio.train.batch import load_plan, plan_from_folder, run_plan, select

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainOptions) if hasattr(args, f.name)}
    given.update({key: getattr(args, key) for key in ("vectors", "init_text") if getattr(args, key, None) is not None})
    plan_path = Path(args.plan)
    if plan_path.is_dir():
        if "model" not in given and os.environ.get(ENV_DEFAULTS["model"]):
            given["model"] = os.environ[ENV_DEFAULTS["model"]]
        plan = plan_from_folder(plan_path, given)
    else:
        plan = load_plan(plan_path, overrides=given)
    if args.count:
        print(len(plan))
        return 0
    jobs = select(plan, args.index, tuple(args.only or ()))
    if args.list:
        for job in jobs:
            print(f"{job.index}\t{job.name}\t{job.train.dataset}\t{job.train.max_steps} steps\t{job.train.model}")
        return 0
    bars: dict[str, ProgressBar] = {}

    def progress(job: Any, p: Any) -> None:
        bars.setdefault(job.name, ProgressBar(job.name, "step"))(p)

    def outcome(done: Any) -> None:
        bar = bars.pop(done.job.name, None)
        if bar is not None:
            bar.close()
        print(f"{done.job.name}: {done.status}: {done.message}", flush=True)

    with stop_on_signals() as stop:
        outcomes = run_plan(jobs, cache_dir=args.cache_dir, stop=stop, on_progress=progress, on_outcome=outcome)
    counts: dict[str, int] = {}
    for done in outcomes:
        counts[done.status] = counts.get(done.status, 0) + 1
    left = len(jobs) - len(outcomes)
    summary = ", ".join(f"{n} {status}" for status, n in counts.items()) + (f", {left} not started" if left else "")
    print(f"{len(jobs)} jobs: {summary}", flush=True)
    return 1 if counts.get("failed") else 0


def cmd_generate(args: argparse.Namespace) -> int:
    from tistudio.generate.images import generate

    options = options_from(args, GenerateOptions)
    with stop_on_signals() as stop:
        images = generate(
            options, cache_dir=args.cache_dir, on_progress=ProgressBar("generating", "step", leave=False), stop=stop
        )
    for image in images:
        print(image.path)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from tistudio.prepare.preprocess import prepare, summary_lines

    bar = ProgressBar("preparing", "photo", leave=False)
    with stop_on_signals() as stop:
        result = prepare(options_from(args, PrepareOptions), on_progress=bar, stop=stop)
    bar.close()
    print("\n".join(summary_lines(result)))
    return 0


def cmd_use_step(args: argparse.Namespace) -> int:
    from tistudio.config import check_name
    from tistudio.train.runfolder import run_folder

    name = check_name(args.name)
    target = Path(args.embeddings_dir) / f"{name}.safetensors"
    path = run_folder(name, args.run_dir).use_step(args.step, target, Path(args.loras_dir))
    print(f"{path} is now step {args.step} of {name}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from tistudio.config import check_fields
    from tistudio.server import ServerConfig, read_auth, serve
    from tistudio.server.security import LOOPBACK_HOSTS

    host = args.host or ("0.0.0.0" if args.listen else "127.0.0.1")
    listening = args.listen or host not in LOOPBACK_HOSTS
    auth = read_auth(args.auth, args.auth_file)
    if listening and not auth:
        raise OptionError(
            "listen",
            host,
            "--listen makes tistudio answer other computers, so it needs a password: "
            "add --auth USER:PASS or --auth-file FILE",
        )
    model = options_from(args, ModelOptions)
    check_fields(model)
    from tistudio.models.loading import check_model_source
    from tistudio.server.workspace import Limits

    check_model_source(model)  # a missing model is said now, not at the first job

    if not math.isfinite(args.max_upload_mb) or args.max_upload_mb <= 0:
        raise OptionError("max_upload_mb", args.max_upload_mb, "must be a positive number of megabytes, e.g. 50")
    if not math.isfinite(args.max_workspace_gb) or args.max_workspace_gb < 0:
        raise OptionError(
            "max_workspace_gb", args.max_workspace_gb, "must be a number of gigabytes, e.g. 200 (0: no cap)"
        )
    limits = Limits(
        upload_bytes=int(args.max_upload_mb * 1024 * 1024), workspace_bytes=int(args.max_workspace_gb * 1024**3)
    )
    from tistudio.models.loading import parse_devices

    devices = parse_devices(args.devices)
    config = ServerConfig(
        workspace=Path(args.workspace),
        model=model,
        cache_dir=args.cache_dir,
        auth=auth,
        listening=listening,
        limits=limits,
        devices=devices,
        trusted_proxies=args.trusted_proxy,
    )
    shown = "localhost" if host in ("127.0.0.1", "::1") else host
    print(
        f"tistudio {__version__}: open http://{shown}:{args.port}/ (API docs at /docs); workspace "
        f"{Path(args.workspace).resolve()}; model {args.model}"
        + ("; password required" if auth else "")
        + (f"; workers on {', '.join(devices)}" if len(devices) > 1 else ""),
        flush=True,
    )
    serve(config, host, args.port)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from tistudio.embeddings.bundle import describe_lora, is_lora, read_lora
    from tistudio.embeddings.files import describe, read_embedding

    path = Path(args.file)
    info = describe_lora(read_lora(path)) if is_lora(path) else describe(read_embedding(path), path)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:>16}: {value}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from tistudio.embeddings.bundle import is_lora, plain_lora_path, read_lora, split_bundle
    from tistudio.embeddings.files import read_embedding

    if is_lora(Path(args.file)):  # a LoRA with its words bundled: the LoRA alone, and each word in the format asked
        lora = read_lora(args.file)
        free_to_write(plain_lora_path(Path(args.out_dir), lora.name), args)
        print(split_bundle(lora, Path(args.out_dir)))
        for word in lora.words.values():
            print(convert_embedding(word, args))
        return 0
    print(convert_embedding(read_embedding(args.file), args))
    return 0


def free_to_write(path: Path, args: argparse.Namespace) -> None:
    if path.exists() and not args.overwrite:  # an earlier conversion (diffusers and onetrainer share the name)
        raise OptionError(
            "out_dir", args.out_dir, f"{path.name} is there already; pass --overwrite, or another --out-dir"
        )


def convert_embedding(embedding: Any, args: argparse.Namespace) -> Path:
    from tistudio.embeddings.files import (
        ONETRAINER_KEY,
        write_a1111_pt,
        write_diffusers,
        write_embedding,
        write_png_embedding,
    )

    suffix = {"a1111": ".pt", "png": ".png"}.get(args.to, ".safetensors")
    path = Path(args.out_dir) / f"{embedding.name}{suffix}"
    free_to_write(path, args)
    if args.to == "a1111":
        path = write_a1111_pt(embedding, path)
    elif args.to == "png":
        path = write_png_embedding(embedding, path)
    elif args.to == "diffusers":
        path = write_diffusers(embedding, path)
    elif args.to == "onetrainer":
        path = write_embedding(embedding, path, single_key=ONETRAINER_KEY)
    else:
        path = write_embedding(embedding, path)
    return path


def build_parser() -> argparse.ArgumentParser:
    def common(parser: argparse.ArgumentParser, default: Any) -> None:
        """Global flags, accepted before or after the command name."""
        parser.add_argument(
            "--cache-dir",
            type=Path,
            default=default_cache_dir() if default is None else default,
            help="cache for the demo model and file hashes (default: $TISTUDIO_CACHE or ~/.cache/tistudio)",
        )
        parser.add_argument(
            "-v", "--verbose", action="count", default=0 if default is None else default, help="more detail"
        )
        parser.add_argument(
            "-q",
            "--quiet",
            action="store_true",
            default=False if default is None else default,
            help="warnings and errors only",
        )

    parser = argparse.ArgumentParser(
        prog="tistudio",
        description="Teach Stable Diffusion a new word from a few photos (textual inversion), then use it in prompts.",
    )
    parser.add_argument("--version", action="version", version=f"tistudio {__version__}")
    common(parser, None)
    shared = argparse.ArgumentParser(add_help=False)
    common(shared, argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=[shared], **kwargs)

    demo = command("demo", help="the whole story on the built-in world model (about a minute)")
    demo.add_argument("--out", default="tistudio-demo", help="folder for the demo run (default: %(default)s)")
    demo.add_argument("--demo-steps", type=int, default=200, help="training steps (default: %(default)s)")
    demo.add_argument(
        "--family",
        choices=("sd1", "sdxl"),
        default="sd1",
        help="the world model's architecture: Stable Diffusion 1.x, or SDXL's two text encoders and "
        "size conditioning (default: %(default)s)",
    )
    demo.set_defaults(run=cmd_demo)

    prepare = command(
        "prepare",
        help="turn a folder of photos into a training set, with a quality report",
        description=PrepareOptions.__doc__,
    )
    add_options(prepare, PrepareOptions)
    prepare.set_defaults(run=cmd_prepare)

    create = command("create", help="create a new embedding", description=CreateOptions.__doc__)
    add_options(create, CreateOptions)
    create.set_defaults(run=cmd_create)

    train = command("train", help="train (or resume) an embedding", description=TrainOptions.__doc__)
    add_options(train, TrainOptions)
    train.set_defaults(run=cmd_train)

    add_train_many(command)
    generate = command("generate", help="generate images with embeddings", description=GenerateOptions.__doc__)
    add_options(generate, GenerateOptions)
    generate.set_defaults(run=cmd_generate)

    add_use_step(command)
    add_serve(command)
    add_file_commands(command)
    return parser


Command = Callable[..., argparse.ArgumentParser]  # adds a subcommand with the global flags


def add_train_many(command: Command) -> None:
    many = command(
        "train-many",
        help="train many embeddings: a jobs .toml plan or a folder of prepared sets",
        description="Train one embedding per job of PLAN, one after another (each model loaded once), "
        "or one job with --index (a cluster's array task). PLAN is a .toml file ([defaults] and [[job]] "
        "tables of train options, plus init_text and vectors for embeddings that do not exist yet; paths "
        "relative to the file) or a folder with one prepared set per embedding, named after it. The "
        "options below apply to every job; in a .toml plan they replace its [defaults], and a job's own "
        "keys win. Run it again to continue: finished jobs are skipped, stopped ones resume. Exits 1 if "
        "any job failed.",
        epilog="A Slurm array over a plan: sbatch --array=0-$(($(tistudio train-many jobs.toml --count) "
        "- 1)) --wrap 'tistudio train-many jobs.toml --index $SLURM_ARRAY_TASK_ID'",
    )
    many.add_argument("plan", help="a jobs .toml file, or a folder of prepared sets (one per embedding)")
    many.add_argument(
        "--index",
        type=int,
        default=None,
        help="run only the job at this 0-based place in the plan (e.g. $SLURM_ARRAY_TASK_ID)",
    )
    many.add_argument("--only", nargs="+", metavar="NAME", help="run only the jobs of these embeddings")
    many.add_argument("--list", action="store_true", help="list the jobs (index, name, dataset, steps, model) and stop")
    many.add_argument("--count", action="store_true", help="print the number of jobs and stop (to size an array job)")
    many.add_argument("--vectors", type=int, default=None, help="vectors per token of embeddings created here")
    many.add_argument(
        "--init-text",
        default=None,
        help="initialization text of embeddings created here (default: a person-like start)",
    )
    add_options(
        many,
        TrainOptions,
        skip=("embedding", "dataset"),
        defaults={f.name: argparse.SUPPRESS for f in dataclasses.fields(TrainOptions)},
    )
    many.set_defaults(run=cmd_train_many)


def add_use_step(command: Command) -> None:
    use_step = command(
        "use-step",
        help="make a saved step of a training run the embedding (nothing is lost)",
        description="Make the copy a run saved at STEP the embedding NAME (pick the step whose "
        "previews look best). The replaced embedding is kept as its step's copy, and training further "
        "still continues from the run's last step.",
    )
    use_step.add_argument("name", help="the embedding's name")
    use_step.add_argument("step", type=int, help="a step with a saved copy (runs/NAME/embeddings/NAME-STEP)")
    use_step.add_argument(
        "--embeddings-dir", "--embeddings", default="embeddings", help="folder of embeddings (default: %(default)s)"
    )
    use_step.add_argument("--run-dir", default="", help="run folder (default: runs/NAME)")
    use_step.add_argument(
        "--loras-dir", default="loras", help="folder of LoRAs, for a word trained with one (default: %(default)s)"
    )
    use_step.set_defaults(run=cmd_use_step)


def add_serve(command: Command) -> None:
    server = command("serve", help="the web page and HTTP API (http://localhost:7860)")
    server.add_argument("--host", default="", help="address to listen on (default 127.0.0.1; 0.0.0.0 with --listen)")
    server.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    server.add_argument("--listen", action="store_true", help="answer other computers too (needs --auth)")
    server.add_argument("--auth", default="", help="USER:PASS (several separated by commas)")
    server.add_argument("--auth-file", default="", help="a file of USER:PASS lines")
    server.add_argument(
        "--workspace",
        default="tistudio-workspace",
        help="folder for everything the server keeps (default: %(default)s)",
    )
    # the model for all of the server's jobs; clip skip is chosen per job
    add_options(server, ModelOptions, skip=("clip_skip",), defaults={"model": "demo"})
    server.add_argument("--max-upload-mb", type=float, default=50, help="largest uploaded file (default: %(default)s)")
    server.add_argument(
        "--max-workspace-gb",
        type=float,
        default=0,
        help="refuse uploads and images past this much in the workspace (default: 0, no cap)",
    )
    server.add_argument(
        "--devices",
        default="",
        help="one worker per device, each with its own model: 'all' (every "
        "CUDA GPU) or e.g. 'cuda:0,cuda:1'; jobs go to the next free one (default: one worker on "
        "--device)",
    )
    server.add_argument(
        "--trusted-proxy",
        default="",
        help="addresses of reverse proxies whose X-Forwarded-For names the client (comma-separated; default: none, "
        "every client is its connection's address)",
    )
    server.set_defaults(run=cmd_serve)


def add_file_commands(command: Command) -> None:
    inspect = command("inspect", help="show what an embedding or LoRA file holds")
    inspect.add_argument("file", help="embedding file (.safetensors, .pt, .bin, .png) or LoRA file")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(run=cmd_inspect)

    convert = command("convert", help="write an embedding (or a LoRA's bundled words) in another tool's format")
    convert.add_argument(
        "file",
        help="embedding file of any supported format, or a LoRA with bundled words (pivotal tuning's "
        "loras/NAME.safetensors: written as NAME.lora.safetensors, the LoRA alone, and each word as --to says)",
    )
    convert.add_argument(
        "--to",
        required=True,
        choices=("a1111", "png", "diffusers", "onetrainer", "safetensors"),
        help="a1111: A1111 .pt; png: a picture A1111 loads as the embedding (its sd-ti-embedding "
        "chunk, and the same data in strips beside the picture); diffusers: {NAME: vectors} "
        "safetensors; onetrainer: OneTrainer's emp_params safetensors; safetensors: tistudio's "
        "(which A1111, Forge, ComfyUI and kohya read)",
    )
    convert.add_argument("--out-dir", default="converted", help="output folder (default: %(default)s)")
    convert.add_argument("--overwrite", action="store_true", help="replace a file of the same name in the folder")
    convert.set_defaults(run=cmd_convert)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with cli_logging(-1 if args.quiet else args.verbose):
            if args.command not in ("inspect", "convert"):
                quiet_third_party()
            return int(args.run(args) or 0)
    except TistudioError as exc:
        close_bars()  # the error on its own line, not at the end of a half-drawn bar (a full disk mid-run)
        print(f"tistudio: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tistudio: aborted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
