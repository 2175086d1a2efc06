"""The ``rwft`` command: train, evaluate, simulate, list plugins, show the config.

Every subcommand takes the same config: ``--config FILE.yaml`` plus ``key=value``
overrides (see ``rwft config``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from rwft.core.errors import RwftError

console = Console(stderr=True, soft_wrap=True)  # never break a path across lines


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="experiment YAML (only what differs from the defaults)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=5")
    parser.add_argument("--config", dest="config_flag", metavar="FILE", help="same as the positional CONFIG")


def _split_config(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """Allow ``rwft train a.yaml k=v``, ``rwft train --config a.yaml k=v`` and ``rwft train k=v``."""
    config, overrides = args.config_flag, list(args.overrides)
    if args.config is not None:
        if "=" in args.config:
            overrides.insert(0, args.config)
        elif config is None:
            config = args.config
        else:
            raise RwftError(f"two config files given: {config} and {args.config}.")
    return config, overrides


def _cmd_train(args: argparse.Namespace) -> int:
    from rwft.core.config import load_resumed_config
    from rwft.core.run import train

    config, overrides = _split_config(args)
    cfg = load_resumed_config(config, overrides, args.resume)
    console.print(f"[bold]rwft train[/bold] {cfg.model.backbone} ({'ImageNet' if cfg.model.pretrained else 'scratch'}, "
                  f"{cfg.model.mode}, adapter {cfg.model.adapter}) on {cfg.data.dataset} at {cfg.data.image_size}px "
                  f"-> {cfg.output_dir}")
    result = train(cfg, resume=args.resume is not None, overwrite=args.overwrite, progress=sys.stderr.isatty())
    _print_metrics("test", result.metrics["test"])
    console.print(f"best epoch {result.metrics['best_epoch']}, threshold {result.metrics['threshold']:.3f} "
                  f"(chosen on validation)")
    console.print(f"run directory: {result.run_dir}  (metrics.json, best.pt, config.yaml)\n"
                  f"TensorBoard:   tensorboard --logdir {result.run_dir / 'tb'}")
    return 0


def _print_metrics(title: str, metrics: dict) -> None:
    from rwft.core.run import summary_table

    table = Table(title=f"{title} metrics ({metrics.get('num_examples', '?')} images)")
    for column in ("metric", "value", "95% CI"):
        table.add_column(column)
    for row in summary_table(metrics):
        table.add_row(*row)
    Console().print(table)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from rwft.core.run import evaluate

    # After CHECKPOINT: more .pt files (an ensemble), the data to score, key=value overrides.
    overrides = [item for item in args.arguments if "=" in item]
    members = [item for item in args.arguments if "=" not in item and item.endswith(CHECKPOINT_SUFFIXES)]
    data = [item for item in args.arguments if "=" not in item and not item.endswith(CHECKPOINT_SUFFIXES)]
    if len(data) > 1:
        raise RwftError(f"rwft evaluate scores one data set at a time, got {', '.join(data)}: give one "
                        "folder or npz file (or data.root=...).")
    checkpoints = [args.checkpoint, *members]
    metrics = evaluate(checkpoints[0] if len(checkpoints) == 1 else checkpoints, overrides,
                       data=data[0] if data else None, split=args.split)
    _print_metrics(f"{metrics['split']} split", metrics)
    if args.output:
        from rwft.core.checkpoint import write_json

        write_json(args.output, metrics)
        console.print(f"written: {args.output}")
    return 0


def _cmd_plugins(args: argparse.Namespace) -> int:
    from rwft.core.plugins import KINDS, get_registries

    registries = get_registries()
    if args.json:
        print(json.dumps({kind: [{"name": r.name, "plugin": r.plugin, "description": r.description}
                                 for r in registries.of(kind)] for kind in KINDS}, indent=2))
        return 0
    rows = [(r.kind, r.name, r.plugin, r.description) for kind in KINDS for r in registries.of(kind)]
    if not sys.stdout.isatty():
        # Piped or redirected: one tab-separated line per plugin, never wrapped or cut (a rich
        # table fits itself into 80 columns and truncates the plugin module names).
        lines = ["\t".join(" ".join(str(field).split()) for field in row)
                 for row in [("kind", "name", "plugin", "description"), *rows]]
        try:
            print("\n".join(lines))
        except BrokenPipeError:  # `rwft plugins | head`: the reader has what it wanted
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (keeps Python's exit flush quiet)
        return 0
    table = Table(title="rwft plugins")
    for column in ("kind", "name", "plugin", "description"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from rwft.core.config import load_config, to_yaml

    config, overrides = _split_config(args)
    print(to_yaml(load_config(config, overrides)), end="")
    return 0


CHECKPOINT_SUFFIXES = (".pt", ".pth")
BUILT_IN_COMMANDS = ("train", "evaluate", "plugins", "config")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rwft", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train and evaluate one model centrally")
    _add_config_arguments(train)
    train.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from RUN_DIR/last.pt")
    train.add_argument("--overwrite", action="store_true",
                       help="replace the run already in output_dir (without it, such a folder is refused)")
    train.set_defaults(handler=_cmd_train)

    evaluate = sub.add_parser("evaluate", help="score a checkpoint (or an ensemble) on its test split or on "
                                               "external data")
    evaluate.add_argument("checkpoint", help="RUN_DIR/best.pt")
    evaluate.add_argument("arguments", nargs="*", metavar="[MORE.pt ...] DATA | key=value",
                          help="more checkpoints (.pt: their ensemble, softmax outputs averaged), the data to "
                               "score (a folder or .npz; default: the checkpoint's data), then key=value "
                               "overrides, e.g. data.class_map.ABNORMAL=PNEUMONIA")
    evaluate.add_argument("--split", choices=("all", "train", "val", "test"), default=None,
                          help="what to score: default 'all' for a folder of class folders (an external site), "
                               "else 'test'")
    evaluate.add_argument("--output", help="also write the metrics as JSON here")
    evaluate.set_defaults(handler=_cmd_evaluate)

    plugins = sub.add_parser("plugins", help="list registered backbones, adapters, strategies, datasets")
    plugins.add_argument("--json", action="store_true")
    plugins.set_defaults(handler=_cmd_plugins)

    config = sub.add_parser("config", help="print the resolved config (defaults + file + overrides)")
    _add_config_arguments(config)
    config.set_defaults(handler=_cmd_config)

    from rwft.core.plugins import get_registries

    for command in get_registries().commands:  # plugin commands parse their own arguments
        sub.add_parser(command.name, help=f"{command.description} (see rwft {command.name} --help)",
                       add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and not argv[0].startswith("-") and argv[0] not in BUILT_IN_COMMANDS:
            from rwft.core.plugins import get_registries

            commands = get_registries().commands
            if argv[0] in commands:  # a plugin's command parses its own arguments
                return int(commands.get(argv[0]).factory(argv[1:]))
        args = build_parser().parse_args(argv)
        return int(args.handler(args))
    except RwftError as exc:
        console.print(f"[bold red]error:[/bold red] {exc}")
        return 2
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
