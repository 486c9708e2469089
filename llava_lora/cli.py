"""``llava-lora``: a thin table from subcommand to stage function.

Each stage module exposes a config dataclass and ``main(cfg) -> int | None``; flags and YAML keys share the
dataclass's field names. Exit codes: 0 the stage did its job, 1 it ran and could not (``RunFailed``: a run that
learned nothing, a data check that found bad records), 2 bad input (``UsageError``: one line naming the cause).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from . import config as cfglib
from .errors import RunFailed, UsageError

# subcommand -> (module, config class name, main function name, one-line help)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "build": ("llava_lora.model.build", "BuildConfig", "main", "compose a chat LLM + a CLIP vision encoder into MODEL_DIR"),
    "data check": ("llava_lora.data.check", "CheckConfig", "main", "validate a LLaVA data set, report bad samples"),
    "data synth": ("llava_lora.data.synth", "SynthConfig", "main", "write a synthetic LLaVA-format data set"),
    "train": ("llava_lora.train.loop", "TrainConfig", "main", "LoRA fine-tuning of MODEL_DIR on DATA into RUN_DIR"),
    "eval": ("llava_lora.infer.evaluate", "EvalConfig", "main", "base vs fine-tuned on data samples"),
    "generate": ("llava_lora.infer.generate", "GenerateConfig", "main", "answer one prompt about its image(s)"),
    "export": ("llava_lora.export.merge", "ExportConfig", "main", "fold the adapter into a plain checkpoint"),
    "demo": ("llava_lora.infer.demo", "DemoConfig", "main", "the Gradio side-by-side page"),
    "config-path": ("llava_lora.train.distributed", "ConfigPathConfig", "main",
                    "print the path of a shipped accelerate config (ddp, fsdp2, zero2, zero3)"),
    "quickstart": ("llava_lora.tiny.quickstart", "QuickstartConfig", "main", "the whole pipeline offline on tiny models"),
}


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    # allow_abbrev=False: `--lr 2e-2` must not quietly become `--lr-scheduler 2e-2`
    parser = argparse.ArgumentParser(prog="llava-lora", description=__doc__.splitlines()[0], allow_abbrev=False,
                                     exit_on_error=False)
    sub = parser.add_subparsers(dest="command", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    leaves: dict[str, argparse.ArgumentParser] = {}
    for name, (module, cls_name, _, help_text) in COMMANDS.items():
        words = name.split()
        parent = sub
        if len(words) == 2:
            if words[0] not in groups:
                gp = sub.add_parser(words[0], help=f"{words[0]} tools", allow_abbrev=False, exit_on_error=False)
                groups[words[0]] = gp.add_subparsers(dest="subcommand", required=True)
            parent = groups[words[0]]
        p = parent.add_parser(words[-1], help=help_text, description=help_text, allow_abbrev=False,
                              exit_on_error=False)
        p.set_defaults(_command=name)
        leaves[name] = p
    return parser, leaves


class CommandLineError(UsageError):
    """A command line that names no valid configuration of ``command``."""

    def __init__(self, command: str, message: str):
        super().__init__(message)
        self.command = command


def parse(argv: list[str]) -> tuple[str, object]:
    """(subcommand, its resolved config) of a command line; ``UsageError`` for an unknown flag or a bad value."""
    parser, leaves = _parser()
    # Only the chosen subcommand's module is imported (torch/transformers load lazily).
    chosen = " ".join(argv[:2]) if " ".join(argv[:2]) in COMMANDS else (argv[0] if argv else "")
    if chosen in COMMANDS:
        module, cls_name, _, _ = COMMANDS[chosen]
        leaves[chosen].add_argument("--config", help="YAML file of config keys, or a packaged recipe's name ("
                                    + ", ".join(cfglib.recipe_names()) + "); flags given here win")
        cfglib.add_arguments(leaves[chosen], getattr(importlib.import_module(module), cls_name))
        argv = cfglib.dashed_argv(argv, cfglib.flag_names(leaves[chosen]))
    try:
        args, unknown = parser.parse_known_args(argv)
    except argparse.ArgumentError as e:  # a bad value: one line, like every other refusal
        raise CommandLineError(chosen if chosen in COMMANDS else "", str(e)) from None
    if unknown:  # one line naming the closest valid flags, not argparse's usage block
        flag = next((u for u in unknown if u.startswith("-")), unknown[0])
        close = cfglib.closest_flags(flag, cfglib.flag_names(leaves[args._command])) if flag.startswith("-") else []
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise CommandLineError(args._command, f"unknown {'flag' if flag.startswith('-') else 'argument'} {flag}"
                               f"{hint} (see llava-lora {args._command} --help)")
    module, cls_name, _, _ = COMMANDS[args._command]
    try:
        return args._command, cfglib.resolve(getattr(importlib.import_module(module), cls_name), args)
    except UsageError as e:
        raise CommandLineError(args._command, str(e)) from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        command, cfg = parse(argv)
    except CommandLineError as e:
        print(f"{f'llava-lora {e.command}'.strip()}: error: {e}", file=sys.stderr)
        return 2
    # peft asks a deprecated transformers property whenever an adapter loads; not the user's concern
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    module, _, fn_name, _ = COMMANDS[command]
    try:
        rc = getattr(importlib.import_module(module), fn_name)(cfg)
    except UsageError as e:
        print(f"llava-lora {command}: error: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f"llava-lora {command}: failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
