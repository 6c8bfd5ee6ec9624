"""``python -m minisq demo | quantize | reproduce`` (also the ``minisq`` console script).

Each subcommand is one program in :mod:`minisq.cli`; ``minisq SUBCOMMAND --help`` lists its
options. Exit status: 0 done; 1 an error, printed as one line (``--debug`` adds the
traceback); 2 bad arguments or an unknown subcommand.
"""

import importlib
import sys

COMMANDS = {  # subcommand -> (its module, what it does)
    "demo": ("minisq.cli.demo", "quantize a model with SmoothQuant and compare it with float and the baselines"),
    "quantize": ("minisq.cli.quantize", "SmoothQuant a checkpoint layer by layer into a folder (big models)"),
    "reproduce": ("minisq.cli.reproduce", "the paper's tables on real models, cached per model and variant"),
}


def usage(prog: str = "minisq") -> str:
    lines = [f"usage: {prog} {{{','.join(COMMANDS)}}} [options]", "", "subcommands:"]
    lines += [f"  {name:<10} {about}" for name, (_, about) in COMMANDS.items()]
    lines += ["", f"{prog} SUBCOMMAND --help shows a subcommand's options."]
    return "\n".join(lines)


def main(argv=None, prog: str = "minisq") -> int:
    """Run ``argv`` (default ``sys.argv[1:]``): the subcommand's exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        print(f"{usage(prog)}\n{prog}: error: name a subcommand", file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(usage(prog))
        return 0
    if argv[0] not in COMMANDS:
        print(f"{usage(prog)}\n{prog}: error: unknown subcommand {argv[0]!r}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:], prog=f"{prog} {argv[0]}")


if __name__ == "__main__":
    sys.exit(main(prog="python -m minisq"))
