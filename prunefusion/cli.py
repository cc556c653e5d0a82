"""`prunefusion`: serve models and build the project's own default models.

    prunefusion serve                      # the default LM on :50051 (built on first start)
    prunefusion serve --config my.yaml     # your models (see README, "Config reference")
    prunefusion models build               # the default LM ($PRUNEFUSION_HOME/models/tiny-lm) and its pruned +
                                           # healed variant (models/tiny-lm-pruned, compression job)
    prunefusion models build --recipe large --out DIR
    prunefusion models build transfusion   # the shapes-world Transfusion model ($PRUNEFUSION_HOME/models/transfusion)
    prunefusion models list
    prunefusion compress measure --model DIR --out runs/measure
    prunefusion compress prune --model DIR --out DIR --fraction 0.25
    prunefusion compress run compression/jobs/tiny-lm-angular-25.yaml --out DIR
    prunefusion score data/*.jsonl --out kept.jsonl
    prunefusion loadtest --serve --models tiny-lm tiny-lm-pruned
    prunefusion pipeline compression/jobs/tiny-lm-angular-25.yaml --out runs/pipeline   # compress, serve both,
                                                                    # load-test, one HTML report
    prunefusion keys create alice --file keys.txt   # an API key (server.auth.api_keys_file); printed once
    prunefusion reliability short --only R1,R4      # the reliability suite (runs/reliability-short/report.md)

Every command has --help. Bad input (a missing file, a value out of range) is one line on stderr and exit status 2
(PRUNEFUSION_DEBUG=1 shows the traceback instead).

This is the one module outside server/ that imports prunefusion.server: `serve` starts it (docs/architecture.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path

from prunefusion.home import default_model_dir, prunefusion_home
from prunefusion.quality import cli as quality_cli

PRUNED_DEFAULT_JOB, PRUNED_DEFAULT_DIR = "tiny-lm-angular-25", "tiny-lm-pruned"  # as in the default server config


def _serve(args: argparse.Namespace) -> int:
    from prunefusion.server.app import serve
    from prunefusion.server.config import load_config

    config = load_config(args.config)
    overrides = {key: value for key, value in (("port", args.port), ("http_port", args.http_port))
                 if value is not None}
    if args.no_build:
        overrides["build_missing_models"] = False
    if overrides:
        config = config.model_copy(update={"server": config.server.model_copy(update=overrides)})
    logging.basicConfig(level=config.server.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(config))
    return 0


def _build(args: argparse.Namespace) -> int:
    if args.what == "transfusion":
        return _build_transfusion(args)
    from prunefusion.models.build import build_model
    from prunefusion.models.recipes import RECIPES

    if args.recipe not in RECIPES:
        raise ValueError(f"unknown LM recipe {args.recipe!r}; choose one of {sorted(RECIPES)}")
    out = Path(args.out) if args.out else default_model_dir("tiny-lm" if args.recipe == "default"
                                                            else f"tiny-lm-{args.recipe}")
    with_pruned = args.recipe == "default" and not args.out and not args.no_pruned
    try:
        result = build_model(args.recipe, out, steps=args.steps, seed=args.seed, force=args.force,
                             device=args.device)
    except FileExistsError:
        if not with_pruned:
            raise
        print(f"{out} exists; kept (--force rebuilds it)")
    else:
        m = result.manifest
        print(f"built {result.path}: {m['num_parameters']:,} parameters, {m['training']['steps']} steps in "
              f"{m['training']['seconds']:.0f} s, held-out perplexity {m['metrics']['held_out_perplexity']:.2f}")
    return _build_pruned(force=args.force) if with_pruned else 0


def _build_transfusion(args: argparse.Namespace) -> int:
    from prunefusion.transfusion.build import RECIPES, build_transfusion

    if args.recipe not in RECIPES:
        raise ValueError(f"unknown Transfusion recipe {args.recipe!r}; choose one of {sorted(RECIPES)}")
    out = Path(args.out) if args.out else default_model_dir(
        "transfusion" if args.recipe == "default" else f"transfusion-{args.recipe}")
    m = build_transfusion(args.recipe, out, steps=args.steps, seed=args.seed, device=args.device, dtype=args.dtype,
                          force=args.force)
    print(f"built {out}: {m['num_parameters']:,} parameters, {m['training']['steps']} steps in "
          f"{m['training']['seconds'] / 60:.1f} min (report.md there)")
    if "evaluation" in m:
        from prunefusion.transfusion.evaluate import goals_table

        for metric, seen, held, goal in goals_table(m["evaluation"]):
            print(f"  {metric:<24} seen {seen:>7}  held-out {held:>7}  {goal}")
    return 0


def _build_pruned(force: bool) -> int:
    """The default LM's pruned + healed variant, through the compression job the default config serves."""
    from prunefusion.models.builds import build

    out = default_model_dir(PRUNED_DEFAULT_DIR)
    if out.exists() and not force:
        print(f"{out} exists; kept (--force rebuilds it)")
        return 0
    manifest = build(PRUNED_DEFAULT_JOB, out, force=force)
    rows = {row["label"]: row["held_out_perplexity"] for row in manifest.metrics.evaluation}
    start, end = manifest.removed
    print(f"built {out}: layers [{start}, {end}) removed and healed; held-out perplexity original "
          f"{rows['original']:.2f}, pruned {rows['pruned']:.2f}, healed {rows['healed']:.2f} (report.md there)")
    return 0


def _list(args: argparse.Namespace) -> int:
    root = prunefusion_home() / "models"
    rows = []
    for manifest in sorted(root.glob("*/manifest.json")):
        m = json.loads(manifest.read_text())
        rows.append((manifest.parent.name, m.get("num_parameters") or 0,
                     m.get("metrics", {}).get("held_out_perplexity") or float("nan"), str(manifest.parent)))
    if not rows:
        print(f"no built models under {root}; run: prunefusion models build")
    for name, params, ppl, path in rows:
        print(f"{name:<24} {params:>12,} params  held-out ppl {ppl:8.2f}  {path}")
    return 0


def _create_key(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from prunefusion.server.auth.keys import KeyLimits, append_key, limit_problems

    try:
        limits = KeyLimits(requests_per_second=args.rps, burst=args.burst, max_concurrent=args.concurrent)
    except ValidationError as err:  # main() prints it, named by flag
        raise ValueError(limit_problems(err, "--")) from None
    models = frozenset(args.models.split(",")) if args.models else None
    key, line = append_key(args.name, Path(args.file) if args.file else None, limits, models)
    where = f"appended to {args.file}" if args.file else "for your keys file (server.auth.api_keys_file)"
    print(f"key line ({where}):\n  {line}\nthe key (shown once; give it to the client as PRUNEFUSION_API_KEY or "
          f"--api-key):", file=sys.stderr)
    print(key)
    return 0


def _reliability(args: argparse.Namespace) -> int:
    from prunefusion.reliability.run import run_suite

    only = [name.strip() for name in args.only.split(",")] if args.only else None
    return run_suite(args.profile, Path(args.out or f"runs/reliability-{args.profile}"), only)


def build_parser() -> argparse.ArgumentParser:
    from prunefusion.models.recipes import RECIPES
    from prunefusion.transfusion.build import RECIPES as TRANSFUSION_RECIPES

    parser = argparse.ArgumentParser(prog="prunefusion", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gRPC server")
    serve.add_argument("--config", help="YAML config (default: the embedded default)")
    serve.add_argument("--port", type=int, help="override server.port")
    serve.add_argument("--http-port", type=int, help="override server.http_port (the OpenAI-compatible HTTP API)")
    serve.add_argument("--no-build", action="store_true", help="never build a missing model (server."
                       "build_missing_models: false): stop at once, naming its directory and the command that builds "
                       "it (what a Kubernetes Deployment runs; a Job builds the models)")
    serve.set_defaults(func=_serve)

    models = sub.add_parser("models", help="build and list the project's own models")
    msub = models.add_subparsers(dest="models_command", required=True)
    build = msub.add_parser("build", help="train the LM on the stdlib corpus, or the Transfusion model on the "
                            "shapes world")
    build.add_argument("what", nargs="?", default="lm", choices=["lm", "transfusion"], help="default: %(default)s")
    build.add_argument("--recipe", default="default", help=f"LM: {sorted(RECIPES)}; transfusion: "
                       f"{sorted(TRANSFUSION_RECIPES)} (default: %(default)s)")
    build.add_argument("--out", help="output directory (default: $PRUNEFUSION_HOME/models/tiny-lm[-RECIPE] or "
                       "transfusion[-RECIPE])")
    build.add_argument("--device", default="cpu", help="torch device to train on, e.g. cuda (default: cpu)")
    build.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                       help="transfusion: autocast dtype for training (default: float32)")
    build.add_argument("--steps", type=int, help="override the recipe's training steps")
    build.add_argument("--seed", type=int, help="override the recipe's seed")
    build.add_argument("--force", action="store_true", help="replace an existing directory")
    build.add_argument("--no-pruned", action="store_true", help="default recipe: skip the pruned + healed variant "
                       f"(compression job {PRUNED_DEFAULT_JOB} into $PRUNEFUSION_HOME/models/{PRUNED_DEFAULT_DIR})")
    build.set_defaults(func=_build)
    listing = msub.add_parser("list", help="list built models under $PRUNEFUSION_HOME")
    listing.set_defaults(func=_list)

    keys = sub.add_parser("keys", help="API keys for server.auth (README, \"Security\")")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    create = ksub.add_parser("create", help="make a key: print it once, and the line (its hash) for the keys file")
    create.add_argument("name", help="the key's name (in access logs and metrics labels)")
    create.add_argument("--file", help="append the line to this keys file (created with mode 600)")
    create.add_argument("--rps", type=float, help="requests per second (token bucket)")
    create.add_argument("--burst", type=int, help="bucket size (default: max(1, rps))")
    create.add_argument("--concurrent", type=int, help="calls in flight at once")
    create.add_argument("--models", help="comma-separated models the key may use (default: all)")
    create.set_defaults(func=_create_key)

    reliability = sub.add_parser("reliability", help="the reliability suite (reliability/): hostile input, soak, "
                                 "faults; JSON + markdown report, exit 0 when every goal passed")
    reliability.add_argument("profile", choices=["short", "long"], help="short: what CI runs; long: RESULTS.md's")
    reliability.add_argument("--only", help="comma-separated scenarios, e.g. R1,R4 (default: all, R1-R7)")
    reliability.add_argument("--out", help="output directory (default: runs/reliability-PROFILE)")
    reliability.set_defaults(func=_reliability)

    from prunefusion.compression.cli import register
    from prunefusion.loadtest.run import register as register_loadtest
    from prunefusion.pipeline.run import register as register_pipeline
    from prunefusion.transfusion.cli import register as register_transfusion

    register(sub)
    register_transfusion(sub)
    quality_cli.register(sub)
    register_loadtest(sub)
    register_pipeline(sub)
    return parser


# A command whose first argument is not one of its subcommands runs this one: `score FILES...` = `score files ...`.
DEFAULT_SUBCOMMANDS = {"score": quality_cli.DEFAULT_SUBCOMMAND}
HELP_FLAGS = ("-h", "--help")


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """A parser's subcommands by name (argparse keeps them in its private action list: there is no public API)."""
    return next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})


def with_default_subcommand(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """Insert a command's default subcommand where the command line leaves it out."""
    if len(argv) < 2 or argv[0] not in DEFAULT_SUBCOMMANDS or argv[1] in HELP_FLAGS:
        return argv
    if argv[1] in subcommands(subcommands(parser)[argv[0]]):
        return argv
    return [argv[0], DEFAULT_SUBCOMMANDS[argv[0]], *argv[1:]]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(with_default_subcommand(parser, argv))
    try:
        return args.func(args)
    except (ValueError, OSError) as err:  # bad input: a missing file, a value out of range, a config error
        if os.environ.get("PRUNEFUSION_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
