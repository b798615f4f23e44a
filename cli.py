"""urm: the command line. Parses arguments, calls one recipe (pipeline.recipes), prints the result.

Each command's options come from the typed stage configs in pipeline/configs/ (help text
included), so `--help`, presets and the docs share one source. Every option can also be set as an
environment variable URM_<OPTION> (which is how `make VAR=...` reaches it). Heavy imports (torch,
transformers) happen inside the commands so `urm --help` is instant.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import sys
import types
import typing
from typing import Optional

import typer

from pipeline import configs as C

app = typer.Typer(
    help="Train uncertainty-aware reward models (URM) on cached LLM embeddings.\n\n"
    "The job: `urm extract` (backbone -> Parquet feature cache), `urm train-heads` (value head, "
    "then gating), `urm export` (Hugging Face model dir), `urm evaluate` (held-out accuracy, calibration, "
    "uncertainty, beside baselines). Start with the offline demo: `make demo` (or `urm demo`).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: long option names and env vars stay readable at 80 columns
)
cache_app = typer.Typer(help="Inspect feature caches.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(cache_app, name="cache")

PRESET_HELP = (f"Preset: a name ({', '.join(C.preset_names())}, shipped in pipeline/configs/) or a path to a "
               ".toml file; artifacts go to cache/PRESET and runs/PRESET unless it says otherwise.")


def fail(message: str, code: int = 1) -> typing.NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _option_type(hint) -> type:
    """Optional[X] for a config field typed X or X | None (options default to None = 'not given')."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return Optional[hint]


def _config_params(*stages: str) -> list[inspect.Parameter]:
    params, seen = [], set()
    for stage in stages:
        for o in C.options(C.STAGES[stage]):
            if not o.cli or o.name in seen:
                continue
            seen.add(o.name)
            flag = "--" + o.name.replace("_", "-")
            short = [o.short] if o.short else []
            decls = [f"{flag}/--no-{flag[2:]}"] if _option_type(o.type) == Optional[bool] else [flag, *short]
            default = o.shown or o.default
            shown = "" if default in (None, [], {}) else f"  [default: {default}, unless the preset sets it]"
            extra = {"metavar": "<str>"} if typing.get_origin(o.type) is list else {}
            option = typer.Option(None, *decls, help=o.help + shown, envvar=f"URM_{o.name.upper()}",
                                  show_default=False, **extra)
            params.append(inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY,
                                            default=option, annotation=_option_type(o.type)))
    return params


def with_config(*stages: str):
    """Add the options of these stage configs to a command; the command receives `configs`
    (stage -> resolved config) in place of them, resolved as preset < option / URM_ variable."""

    def decorate(func):
        own = [p for name, p in inspect.signature(func).parameters.items() if name != "configs"]
        extra = _config_params(*stages)
        preset = inspect.Parameter("preset", inspect.Parameter.KEYWORD_ONLY, annotation=str,
                                   default=typer.Option(C.DEFAULT_PRESET, "--preset", "-p",
                                                        help=PRESET_HELP, envvar="URM_PRESET"))
        own_names = {p.name for p in own}
        secrets = {o.name for s in stages for o in C.options(C.STAGES[s]) if o.secret}

        @functools.wraps(func)
        def wrapper(**kwargs):
            overrides = {p.name: kwargs.pop(p.name) for p in extra}
            for name in secrets:  # click drops an empty URM_ variable: for a key, empty is a value, and refused
                if overrides[name] is None and os.environ.get(f"URM_{name.upper()}") is not None:
                    overrides[name] = os.environ[f"URM_{name.upper()}"]
            name = kwargs.pop("preset")
            try:
                configs = {s: C.load_config(s, name, overrides) for s in stages}
            except C.ConfigError as e:
                fail(str(e), 2)
            return func(configs=configs, **{k: v for k, v in kwargs.items() if k in own_names})

        wrapper.__signature__ = inspect.Signature(own + [preset] + extra)
        return wrapper

    return decorate


def require(config, *names: str) -> None:
    """Options a command cannot run without (given on the command line or as URM_ variables)."""
    for name in names:
        if getattr(config, name) is None:
            fail(f"missing option --{name.replace('_', '-')} (or URM_{name.upper()})", 2)


def run_or_fail(fn, *args, **kwargs):
    """Call a pipeline function: expected failures (bad data, bad config, ...) become one clear line, and so
    does anything unforeseen (its traceback only with --debug or URM_DEBUG=1)."""
    from pipeline.errors import AlreadyReported, UserError

    try:
        return fn(*args, **kwargs)
    except AlreadyReported:
        raise typer.Exit(1)
    except UserError as e:
        fail(str(e))
    except KeyboardInterrupt:
        typer.secho("interrupted: complete parts are kept; run the same command again to resume.",
                    err=True, fg=typer.colors.YELLOW)
        raise typer.Exit(130)
    except Exception as e:  # a bug, or an input no check foresaw: still one line unless asked
        if os.environ.get("URM_DEBUG"):
            raise
        fail(f"unexpected {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (an input no check "
             "foresaw, or a bug: please report it; --debug or URM_DEBUG=1 shows the traceback)")


def speak(ctx: typer.Context, level: int) -> None:
    """The pipeline's log lines (its "pipeline" loggers) to stderr, each as its words alone, from ``level`` up;
    undone when the command ends (tests run many commands in one process)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    package = logging.getLogger("pipeline")
    before = package.level, package.propagate
    package.setLevel(level)
    package.propagate = False  # said once, here, whatever a library does to the root logger
    package.addHandler(handler)

    def undo():
        package.removeHandler(handler)
        package.setLevel(before[0])
        package.propagate = before[1]

    ctx.call_on_close(undo)


@app.callback()
def main(ctx: typer.Context,
         debug: bool = typer.Option(False, "--debug", help="Show the Python traceback of an unexpected error "
                                    "(also URM_DEBUG=1)."),
         quiet: bool = typer.Option(False, "--quiet", "-q", envvar="URM_QUIET",
                                    help="Warnings and errors only: no progress lines or progress bars (the results "
                                    "and the error line still print)."),
         verbose: bool = typer.Option(False, "--verbose", "-v", envvar="URM_VERBOSE",
                                      help="Also the debug lines (each stage's resolved settings, ...).")):
    """Train uncertainty-aware reward models (URM) on cached LLM embeddings."""
    if debug:
        os.environ["URM_DEBUG"] = "1"
    if quiet and verbose:
        fail("--quiet and --verbose ask for opposite things: give one of them", 2)
    speak(ctx, logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)


def report_training(summary: dict) -> None:
    val = summary["val"]
    if "accuracy" in val:
        line = (f"gate: val accuracy {val['accuracy']:.4f} (equal weights {val['equal_weights']['accuracy']:.4f}), "
                f"BT loss {val['bt_loss']:.4f}")
        chance = val.get("chance") or {}
        if chance and not chance["better_than_chance"]:
            line += (f" (NOT shown better than chance: {chance['wins']} of {chance['untied']} untied "
                     f"{chance['where']} pairs right, sign test p = {chance['p_value']:.3g})")
    else:
        line = f"value head: val MSE {val['mse']:.4f}, Pearson r {val['pearson']:.3f}, NLL {val['nll']:.3f}"
    typer.echo(f"{line}; heads saved in {summary['heads_dir']}")


# ----------------------------------------------------------------------------------------------


@app.command()
@with_config("extract")
def extract(
    names: Optional[list[str]] = typer.Argument(None, help="Datasets of the preset to extract (default: all)."),
    configs: dict = None,
):
    """Run the frozen backbone once over the datasets; cache last-token hidden states as Parquet.

    \b
    Example: urm extract --preset demo            (both demo datasets)
             urm extract --source ../shared/data/pandalm-test.jsonl --kind preferences --name pandalm
    """
    from pipeline.recipes.extract import run_extract

    run_or_fail(run_extract, configs["extract"], names=names)


@app.command("train-heads")
@with_config("value_head", "gating")
def train_heads(configs: dict = None):
    """Stage 1 (value head on ratings) then stage 2 (gating on preferences), on cached features.

    \b
    Example: urm train-heads --preset demo --loss nll --ensemble 4
    """
    from pipeline.recipes.train import train_heads

    for summary in run_or_fail(train_heads, configs["value_head"], configs["gating"]):
        report_training(summary)


@app.command("train-value-head")
@with_config("value_head")
def train_value_head_cmd(configs: dict = None):
    """Stage 1 only: fit the Gaussian value head on the ratings cache.

    \b
    Example: urm train-value-head --preset demo --loss nll
    """
    from pipeline.recipes.train import train_value_head

    report_training(run_or_fail(train_value_head, configs["value_head"]))


@app.command("train-gating")
@with_config("gating")
def train_gating_cmd(configs: dict = None):
    """Stage 2 only: fit the gating layer with the Bradley-Terry loss (value head frozen).

    \b
    Example: urm train-gating --preset demo --gate softmax
    """
    from pipeline.recipes.train import train_gating

    report_training(run_or_fail(train_gating, configs["gating"]))


@app.command()
@with_config("export")
def export(configs: dict = None):
    """Stitch the trained heads onto the backbone as a Hugging Face model directory.

    \b
    Example: urm export --preset demo --out-dir runs/demo/model
    """
    from pipeline.recipes.export import export_model, summary

    typer.echo(summary(run_or_fail(export_model, configs["export"])))


@app.command()
@with_config("evaluate")
def evaluate(
    model_dir: Optional[str] = typer.Argument(None, help="Heads folder or exported model directory "
                                                         "(default: the preset's heads)."),
    configs: dict = None,
):
    """Evaluate trained heads on held-out caches beside baselines: accuracy, calibration, uncertainty.

    Pairs: accuracy overall, per subset and in RewardBench's sections; ECE and Brier of P(chosen);
    for each uncertainty signal, AUROC for the wrong pairs and accuracy on the most certain pairs.
    Ratings: MSE, Pearson and Spearman r, NLL and interval coverage per attribute. The baselines are
    fitted on the heads' own training caches. Writes report.json, report.md and PNG plots.

    \b
    Example: urm evaluate --preset demo                     (the demo's held-out caches)
             urm evaluate runs/demo/model --eval-preferences cache/demo/eval_preferences --no-baselines
    """
    from pipeline.recipes.evaluate import run_evaluate, summary

    typer.echo(summary(run_or_fail(run_evaluate, configs["evaluate"], model_dir)))


@app.command()
@with_config("score")
def score(
    model_dir: str = typer.Argument(..., help="Exported model directory."),
    configs: dict = None,
):
    """Score conversations (or pairs) with an exported model: score, std, per-attribute means/stds.

    Conversations: rows with a `messages` list (or HelpSteer2 prompt/response). Pairs: chosen/rejected
    rows in any format `urm extract` reads; each pair also gets P(chosen better) under Bradley-Terry
    and under the Gaussian scores. Every conversation also gets `reward`, the --reward transform
    (mean: the score; lcb: score - risk x score_std, aleatoric; elcb: score - risk x epistemic_std, epistemic;
    min, uwo: from the ensemble, epistemic). Heads with a ridge posterior (--loss ridge) also state
    `epistemic_std` per row. The summary line goes to stderr, so stdout stays pure JSONL.

    \b
    Example: urm score runs/demo/model --input ../shared/data/pandalm-test.jsonl -o scores.jsonl
    """
    from pipeline.recipes.score import score_file, summary

    require(configs["score"], "input")
    result = run_or_fail(score_file, model_dir, configs["score"])
    typer.echo(summary(result), err=True)


@app.command()
@with_config("curate")
def curate(
    model_dir: str = typer.Argument(..., help="Exported model directory (or, for a preference cache, a heads folder)."),
    configs: dict = None,
):
    """Curate preference pairs with the model's uncertainty: flag the pairs it confidently reverses, keep the
    ones it is most certain of; or (--select N) pick the unlabelled pairs to label next.

    Writes --out-dir's scored.jsonl (per pair: p_chosen, p_chosen_gaussian, the ensemble's disagreement, suspect,
    kept), OUT_DIR/curated.jsonl (the kept pairs, TRL conversational chosen/rejected rows that `urm extract`
    reads), report.md and p_chosen.png. With --select: selected.jsonl instead of curated.jsonl.

    \b
    Example: urm curate runs/demo/model -i ../shared/data/ultrafeedback-binarized-sample-train.jsonl --out-dir curated/
             urm curate runs/demo/model -i unlabelled.jsonl --select 100 --out-dir to-label/
    """
    from pipeline.recipes.curate import run_curate, summary

    require(configs["curate"], "input", "out_dir")
    typer.echo(summary(run_or_fail(run_curate, model_dir, configs["curate"])), err=True)


@app.command()
def demo(preset: str = typer.Option(C.DEFAULT_PRESET, "--preset", "-p", help=PRESET_HELP, envvar="URM_PRESET")):
    """The whole job in one command: extract, train-heads, export, evaluate; then the export scores the
    sigmoid example (both answers with their uncertainty, P(answer 2 better)) and the run ends with the
    evaluation's tables and where the cache, heads, export and report are.

    Complete caches are kept, so a rerun skips the backbone; the heads are trained and exported again
    (the preset's export is replaced). Each step takes its options from the preset; to change one, run
    that step's own command (`urm extract --help`, ...).

    \b
    Example: urm demo                  (the offline demo: SmolLM2-135M on CPU, synthetic data; `make demo`)
    """
    from pipeline.recipes.demo import load_configs, run_demo, summary

    try:
        load_configs(preset)  # every stage's options checked before anything loads
    except C.ConfigError as e:
        fail(str(e), 2)
    typer.echo(summary(run_or_fail(run_demo, preset)))


@app.command()
@with_config("serve")
def serve(
    model_dir: str = typer.Argument(..., help="Exported model directory."),
    configs: dict = None,
):
    """Serve an exported model over HTTP for RLHF loops: batched scores with uncertainty.

    POST /score takes {"conversations": [[{role, content}, ...] or "templated text", ...]} and returns
    each one's score, score_std, per-attribute means / stds / gate weights (and the ensemble spread and
    epistemic_std where the export has them);
    POST /get_reward speaks OpenRLHF's remote reward-model protocol ({"query": [...]} -> {"rewards":
    [...]}); GET /health gives the model's metadata. Requests that arrive together are batched under
    the token budget. --reward (mean, lcb, elcb, min, uwo) and --risk choose the reward the answers carry; a
    request may name its own. Listens on loopback unless --host says otherwise; --api-key (or
    URM_API_KEY) requires `Authorization: Bearer KEY` on every request (401 otherwise).
    SIGTERM or Ctrl-C lets the requests in flight finish, then stops.

    \b
    Example: urm serve runs/demo/model --port 8000
             curl -s localhost:8000/get_reward -d '{"query": ["<s><|user|>..."]}'
    """
    from pipeline.recipes.serve import run_serve, summary

    typer.echo(summary(run_or_fail(run_serve, model_dir, configs["serve"])), err=True)


@cache_app.command("info")
def cache_info(path: str = typer.Argument(..., help="A cache folder (holding _manifest.json)."),
               verify: bool = typer.Option(True, "--verify/--no-verify", help=C.VERIFY_HELP)):
    """Print a cache's manifest summary and row counts; exit 1 when it is damaged or incomplete.

    \b
    Example: urm cache info cache/demo/ratings
    """
    from pipeline.recipes.cache_info import UnusableCache
    from pipeline.recipes.cache_info import cache_info as info

    def info_or_summary():
        try:
            return info(path, verify)
        except UnusableCache as e:  # the summary still helps: print it, then fail saying why
            typer.echo(e.summary)
            raise

    typer.echo(run_or_fail(info_or_summary))


if __name__ == "__main__":
    sys.exit(app())
