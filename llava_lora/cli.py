"""``llava-lora``: a thin table from subcommand to stage function (see DESIGN.md, command-line contract).

Each stage module exposes a config dataclass and ``main(cfg) -> int | None``; flags and YAML keys share
the dataclass's field names.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from . import config as cfglib
from .errors import UsageError

# subcommand -> (module, config class name, main function name, one-line help)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "build": ("llava_lora.build", "BuildConfig", "main", "compose a chat LLM + a CLIP vision encoder into MODEL_DIR"),
    "data check": ("llava_lora.data.check", "CheckConfig", "main", "validate a LLaVA data set, report bad samples"),
    "data synth": ("llava_lora.data.synth", "SynthConfig", "main", "write a synthetic LLaVA-format data set"),
    "train": ("llava_lora.train", "TrainConfig", "main", "LoRA fine-tuning of MODEL_DIR on DATA into RUN_DIR"),
    "eval": ("llava_lora.evaluate", "EvalConfig", "main", "base vs fine-tuned on data samples"),
    "generate": ("llava_lora.generate", "GenerateConfig", "main", "answer one prompt about one image"),
    "export": ("llava_lora.export", "ExportConfig", "main", "fold the adapter into a plain checkpoint"),
    "demo": ("llava_lora.demo", "DemoConfig", "main", "the Gradio side-by-side page"),
    "quickstart": ("llava_lora.quickstart", "QuickstartConfig", "main", "the whole pipeline offline on tiny models"),
}


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(prog="llava-lora", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    leaves: dict[str, argparse.ArgumentParser] = {}
    for name, (module, cls_name, _, help_text) in COMMANDS.items():
        words = name.split()
        parent = sub
        if len(words) == 2:
            if words[0] not in groups:
                gp = sub.add_parser(words[0], help=f"{words[0]} tools")
                groups[words[0]] = gp.add_subparsers(dest="subcommand", required=True)
            parent = groups[words[0]]
        p = parent.add_parser(words[-1], help=help_text, description=help_text)
        p.set_defaults(_command=name)
        leaves[name] = p
    return parser, leaves


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser, leaves = _parser()
    # Only the chosen subcommand's module is imported (torch/transformers load lazily).
    chosen = " ".join(argv[:2]) if " ".join(argv[:2]) in COMMANDS else (argv[0] if argv else "")
    if chosen in COMMANDS:
        module, cls_name, _, _ = COMMANDS[chosen]
        leaves[chosen].add_argument("--config", help="YAML file of config keys; flags given here win")
        cfglib.add_arguments(leaves[chosen], getattr(importlib.import_module(module), cls_name))
    args = parser.parse_args(argv)
    # peft asks a deprecated transformers property whenever an adapter loads; not the user's concern
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    module, cls_name, fn_name, _ = COMMANDS[args._command]
    mod = importlib.import_module(module)
    try:
        cfg = cfglib.resolve(getattr(mod, cls_name), args)
        rc = getattr(mod, fn_name)(cfg)
    except UsageError as e:
        print(f"llava-lora {args._command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
