"""The `treegrpo` command line. Thin on purpose: parse arguments, call a function, print the result."""

from __future__ import annotations

import os

# transformers warns at import that torchvision is missing (we use PIL processors on purpose); keep the CLI quiet
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.table import Table

import treegrpo
import treegrpo.options as opt  # the parameters' Typer annotations
from treegrpo.commands.envinfo import collect_env, package_version

app = typer.Typer(
    name="treegrpo",
    rich_markup_mode=None,  # plain help: flags without a value placeholder, values with the metavars below
    help="TreeGRPO: RL fine-tuning of diffusers text-to-image models with tree-shaped rollouts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
console = Console()


def _print_version(value: bool) -> None:
    if value:
        console.print(f"treegrpo {treegrpo.__version__} (diffusers_tree {package_version('diffusers-tree')})")
        raise typer.Exit()


VERBOSE = [False]


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", help="Show the libraries' warnings and loading bars (hidden by default).")
    ] = False,
) -> None:
    """TreeGRPO: RL fine-tuning of diffusers text-to-image models with tree-shaped rollouts."""
    VERBOSE[0] = verbose


@app.command()
def info() -> None:
    """Print the versions of the packages treegrpo uses and the device torch sees."""
    table = Table(title="treegrpo environment")
    table.add_column("item")
    table.add_column("value")
    for row in collect_env():
        table.add_row(row.name, row.value)
    console.print(table)


RecipeArg = Annotated[Path, typer.Argument(help="A TOML recipe (see recipes/ and docs/recipes.md).", metavar="RECIPE")]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", metavar="KEY=VALUE",
                 help="Override a recipe key, e.g. --set tree.branch_factor=2 (repeatable)."),
]


def _print_error(message: str) -> None:
    console_err = Console(stderr=True, soft_wrap=True)  # one line, whatever the terminal width
    console_err.print("[bold red]error[/]: ", end="")
    console_err.print(message, markup=False, highlight=False)


def _fail(message: str, code: int = 2) -> NoReturn:
    _print_error(message)
    raise typer.Exit(code)


def _quiet_libraries() -> None:
    from treegrpo.commands.arguments import quiet_libraries

    quiet_libraries(verbose=VERBOSE[0])


def _load(recipe: Path, overrides: list[str] | None):
    from treegrpo.recipe.loading import load_recipe
    from treegrpo.recipe.schema import RecipeError

    try:
        return load_recipe(recipe, overrides or [])
    except RecipeError as err:
        _fail(str(err))


def _preflight(loaded, about_to_load: bool = False) -> None:
    from treegrpo.recipe.preflight import PreflightError, preflight

    try:
        preflight(loaded, about_to_load=about_to_load)
    except PreflightError as err:
        _fail(str(err))


@app.command()
def check(
    recipe: RecipeArg,
    overrides: SetOption = None,
    num_processes: Annotated[int, typer.Option(min=1, help="Processes the run will use (for the per-process "
                                               "share).", metavar="N")] = 1,
    gpu_memory: Annotated[str | None, typer.Option(
        "--gpu-memory", metavar="GiB|CARD", help="Also print a memory plan per process for a GPU of this size "
        "(24, 80GB, H100, 4090, ...) and what to change if it does not fit.")] = None,
) -> None:
    """Validate a recipe and the files it names, and print the plan: leaves, rows and trained edges per epoch,
    prompts per process. What needs the model itself (LoRA targets, image size) is checked when `run` loads it."""
    loaded = _load(recipe, overrides)  # recipe and files first: a typo is reported before any heavy import
    _preflight(loaded)
    from treegrpo.recipe.plan import make_plan, plan_rows

    if loaded.data.prompts_per_epoch % num_processes:
        _fail(f"data.prompts_per_epoch={loaded.data.prompts_per_epoch} is not divisible by {num_processes} "
              "processes.")
    table = Table(title=f"{recipe}: valid", show_header=False)
    for name, value in plan_rows(loaded, make_plan(loaded, num_processes)):
        table.add_row(name, value)
    console.print(table)
    if gpu_memory is not None:
        from treegrpo.commands.memory_plan import print_memory_plan

        try:
            print_memory_plan(loaded, gpu_memory, console)
        except ValueError as err:
            _fail(str(err))


@app.command()
def run(
    recipe: RecipeArg,
    overrides: SetOption = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the newest intact checkpoint in output.dir.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace the run already in output.dir (its checkpoints, metrics, "
                           "final/ and samples are deleted).")
    ] = False,
) -> None:
    """Train with TreeGRPO (or the flat/mix baselines). Under `accelerate launch -m treegrpo run ...` every
    process runs this. Ctrl-C, SIGTERM or SIGHUP: checkpoint at the next safe point and exit 130/143/129; a second
    signal stops at once."""
    from treegrpo.run.signals import StopNow, StopSignals, exit_code, guard_output_streams, signal_name

    guard_output_streams()  # a piped output whose reader dies (Ctrl-C on `... | tee log`) must not end the run
    signals = StopSignals().install()  # before the slow imports: a signal now stops at once, with a message
    folder = None
    try:
        loaded = _load(recipe, overrides)  # recipe and files first: a typo is reported before any heavy import
        _preflight(loaded, about_to_load=True)
        folder = _lock_output_folder(loaded, resume, overwrite)  # a finished or busy output.dir, before the imports
        _quiet_libraries()
        from treegrpo.errors import Interrupted, TrainingError, UsageError
        from treegrpo.train.trainer import train

        try:
            final = train(loaded, resume=resume, overwrite=overwrite, signals=signals, folder=folder)
        except (UsageError, TrainingError) as err:  # exit 2 / exit 1 (treegrpo.errors)
            _fail(str(err), code=err.exit_code)
        except Interrupted as stop:
            Console(stderr=True, soft_wrap=True).print(f"interrupted: {stop.message}", markup=False,
                                                       highlight=False)
            raise typer.Exit(stop.exit_code) from None
    except StopNow as stop:
        Console(stderr=True).print(f"interrupted: {signal_name(stop.args[0])} before training started; nothing "
                                   "was written.")
        raise typer.Exit(exit_code(stop.args[0])) from None
    finally:
        signals.restore()
        if folder is not None:
            folder.release()  # train() released it already; this covers an interruption before train() began
    console.print(f"done: LoRA/weights in {final}")


def _lock_output_folder(loaded, resume: bool, overwrite: bool):
    from treegrpo.run.folder import RunFolderError, prepare_folder

    try:
        return prepare_folder(loaded, resume=resume, overwrite=overwrite)
    except RunFolderError as err:
        _fail(str(err))


def _judged_sampling_arguments(model: str, prompt, prompts_file, dtype: str, image=None
                               ) -> tuple[list[str], list[dict]]:
    from treegrpo.commands.arguments import judge_sampling_arguments
    from treegrpo.errors import UsageError

    try:
        return judge_sampling_arguments(model, prompt, prompts_file, dtype, image)
    except UsageError as err:
        _fail(str(err))


@app.command()
def sample(
    model: opt.ModelArg,
    lora: opt.LoraOption = None,
    prompt: opt.PromptOption = None,
    prompts_file: opt.PromptsFileOption = None,
    image: opt.SourceImageOption = None,
    auto_resize: opt.AutoResizeOption = None,
    out: Annotated[Path, typer.Option("--out", metavar="FOLDER",
                                      help="Folder for the images and grid.png.")] = Path("runs/samples"),
    num_images: Annotated[int, typer.Option("--num-images", min=1, metavar="N",
                                            help="Images per prompt (plain sampling).")] = 4,
    steps: opt.StepsOption = None,
    guidance: opt.GuidanceOption = None,
    height: opt.SizeOption = None,
    width: opt.SizeOption = None,
    seed: opt.SeedOption = 0,
    dtype: opt.DtypeOption = "fp32",
    best_of_tree: opt.BestOfTreeOption = False,
    reward: opt.ScorerOption = None,
    branch_factor: opt.BranchFactorOption = "3",
    window_width: opt.WindowWidthOption = None,
    window_start: opt.WindowStartOption = None,
    beam: opt.BeamOption = None,
    tail_steps: opt.TailStepsOption = None,
) -> None:
    """Generate images (plain ODE sampling, or best-of-tree with a reward as scorer); writes images and a grid."""
    from treegrpo.errors import UsageError
    from treegrpo.recipe.preflight import branch_factor_argument

    try:  # everything that needs no model is judged first, before the slow imports
        if (best_of_tree or beam) and reward is None:
            raise UsageError(f"{'--beam' if beam else '--best-of-tree'} needs --reward KIND to score the leaves "
                             "(e.g. --reward pickscore, or --reward digits for builtin:digits).")
        factors = branch_factor_argument(branch_factor)
    except UsageError as err:
        _fail(str(err))
    prompts, metadata = _judged_sampling_arguments(model, prompt, prompts_file, dtype, image)
    from treegrpo.commands.inference import SampleRequest, Settings, sample_images

    _quiet_libraries()
    from treegrpo.commands.arguments import use_free_cpu_threads

    use_free_cpu_threads()
    request = SampleRequest(model=model, lora=lora, prompts=prompts, out=out, num_images=num_images, dtype=dtype,
                            settings=Settings(steps=steps, guidance_scale=guidance, height=height, width=width,
                                              seed=seed, auto_resize=auto_resize),
                            reward=reward if (best_of_tree or beam) else None, branch_factor=factors,
                            window_width=window_width, window_start=window_start, beam=beam, tail_steps=tail_steps,
                            metadata=metadata)
    try:
        lines = sample_images(request)
    except (UsageError, ValueError) as err:
        _fail(str(err))
    for line in lines:
        console.print(line)


@app.command("eval")
def evaluate_command(
    model: opt.ModelArg,
    reward: Annotated[list[str], typer.Option("--reward", metavar="KIND[:KEY=VALUE,...]",
                                              help="Reward kind or kind:key=value,... (repeatable).")],
    lora: opt.LoraOption = None,
    prompt: opt.PromptOption = None,
    prompts_file: opt.PromptsFileOption = None,
    image: opt.SourceImageOption = None,
    auto_resize: opt.AutoResizeOption = None,
    num_images: Annotated[int, typer.Option("--num-images", min=1, help="Images per prompt.", metavar="N")] = 4,
    steps: opt.StepsOption = None,
    guidance: opt.GuidanceOption = None,
    seed: opt.SeedOption = 0,
    dtype: opt.DtypeOption = "fp32",
    json_out: Annotated[Path | None, typer.Option("--json", metavar="FILE",
                                                  help="Also write the results as JSON here.")] = None,
) -> None:
    """Mean ± std of each reward over the prompts, for the base model and base + LoRA on paired noise. With a
    GenEval .jsonl (--prompts) and a reward that judges right/wrong (geneval), also GenEval's table: accuracy per
    category and overall (the mean of the categories)."""
    prompts, metadata = _judged_sampling_arguments(model, prompt, prompts_file, dtype, image)  # before slow imports
    from treegrpo.commands.inference import EvalBar, Settings, eval_table, evaluate, write_json
    from treegrpo.errors import UsageError

    _quiet_libraries()
    from treegrpo.commands.arguments import use_free_cpu_threads

    use_free_cpu_threads()
    try:
        with EvalBar() as bar:
            data = evaluate(model, prompts, reward, lora=lora, num_images=num_images, dtype=dtype,
                            settings=Settings(steps=steps, guidance_scale=guidance, seed=seed,
                                              auto_resize=auto_resize), progress=bar,
                            metadata=metadata)
    except (UsageError, ValueError) as err:
        _fail(str(err))
    console.print(eval_table(data))
    if json_out is not None:
        write_json(data, json_out)


@app.command("reward-server")
def reward_server(
    kind: Annotated[str, typer.Argument(metavar="KIND",
                                        help="Built-in reward kind to serve (pickscore, hpsv2, python, ...).")],
    option: Annotated[list[str] | None, typer.Option("--option", help="A reward option key=value (repeatable), "
                                                     "e.g. --option scale=flow_grpo.", metavar="KEY=VALUE")] = None,
    host: Annotated[str, typer.Option(metavar="ADDRESS",
                                      help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.", metavar="PORT")] = 8000,
    dtype: opt.DtypeOption = "fp32",
    devices: opt.ServerDevicesOption = None,
    max_batch: opt.ServerBatchOption = 64,
    backend: opt.ServerBackendOption = "auto",
    max_body_mb: opt.ServerBodyOption = 256,
) -> None:
    """Serve a reward kind over HTTP for `kind = "http"` rewards (POST /score, GET /health); see docs/rewards.md."""
    from treegrpo.dtypes import DTYPE_NAMES

    if dtype not in DTYPE_NAMES:
        _fail(f"--dtype {dtype!r}: choose fp32, bf16 or fp16.")
    from treegrpo.commands.reward_server import serve_reward
    from treegrpo.errors import UsageError

    _quiet_libraries()
    try:
        serve_reward(kind, option or [], host=host, port=port, dtype=dtype, announce=console.print, devices=devices,
                     max_batch=max_batch, backend=backend, max_body_bytes=max_body_mb << 20)
    except (UsageError, OSError, ImportError) as err:
        _fail(str(err))


@app.command()
def push(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR",
                                            help="A run folder (the output.dir of `treegrpo run`).")],
    repo: Annotated[str, typer.Option("--repo", metavar="USER/NAME",
                                      help="Hub repo id `user/name`; created if it does not exist.")],
    private: Annotated[bool, typer.Option("--private", help="Create the repo private (an existing repo keeps "
                                          "its visibility).")] = False,
    revision: Annotated[str | None, typer.Option("--revision", help="Branch to push to (created from main if "
                                                 "needed).", metavar="BRANCH")] = None,
    base_model: Annotated[str | None, typer.Option("--base-model", help="Hub id of the base model, for the card "
                                                   "when the run used a local folder.", metavar="HUB_ID")] = None,
) -> None:
    """Upload a run's LoRA to the Hub with a model card, sample grids, reward curve, recipe and metrics."""
    from treegrpo.hub.push import push_run
    from treegrpo.hub.summary import PushError

    try:
        url = push_run(run_dir, repo, private=private, revision=revision, base_model=base_model)
    except PushError as err:
        _fail(str(err))
    console.print(f"pushed: {url}", soft_wrap=True, highlight=False)  # one line: the URL stays copyable


def main() -> None:
    """Entry point of the `treegrpo` console script and of `python -m treegrpo`. Usage errors (a missing argument,
    an unknown option) come out as one `error:` line like every other error, with the command's help hint."""
    from treegrpo.run.signals import guard_output_streams

    exceptions = _click_exceptions()
    no_args_help = getattr(exceptions, "NoArgsIsHelpError", ())  # click >= 8.2 (older ones print the help and exit)
    guard_output_streams()  # `treegrpo --help | head` and the like: a reader that leaves early is not an error
    try:
        code = app(prog_name="treegrpo", standalone_mode=False)
    except no_args_help as err:  # `treegrpo` alone: the help, as no_args_is_help promises
        print(err.format_message())
        raise SystemExit(0) from None
    except exceptions.ClickException as err:
        ctx = getattr(err, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        _print_error(f"{err.format_message()}{hint}")
        raise SystemExit(err.exit_code) from None
    except (typer.Abort, getattr(exceptions, "Abort", typer.Abort)):  # click's own Abort under Typer 0.16
        raise SystemExit(1) from None
    raise SystemExit(code if isinstance(code, int) else 0)


def _click_exceptions():
    """The exceptions module of the click Typer runs on: recent Typer vendors click (`typer._click`), Typer 0.16
    (the lowest we allow) uses click itself."""
    try:
        from typer._click import exceptions
    except ImportError:
        from click import exceptions
    return exceptions
